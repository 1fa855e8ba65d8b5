"""The `weakseg` command line. Each command parses its arguments and calls one step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from weakseg.errors import WeaksegError
from weakseg.progress import console, progress_bar

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Weakly supervised semantic segmentation from image-level labels.",
)
out_console = Console()  # results go to stdout; progress and errors to stderr
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate datasets.")
app.add_typer(data_app, name="data")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _metrics_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("contour F", justify="right")
    for name, iou in summary["per_class_iou"].items():
        table.add_row(name, _fmt(iou), _fmt(summary["per_class_f"].get(name)))
    table.add_section()
    table.add_row("[bold]J (mIoU)", _fmt(summary["miou"]), "")
    table.add_row("[bold]F (contour)", "", _fmt(summary["contour_f"]))
    table.add_row("[bold]J&F", _fmt(summary["jf"]), "")
    table.add_row("boundary IoU", _fmt(summary["boundary_iou"]), "")
    table.add_row("precision / recall", f"{_fmt(summary['precision'])} / {_fmt(summary['recall'])}", "")
    return table


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory for results.json, overlays and label maps."),
    quick: bool = typer.Option(False, "--quick", help="Smaller data and schedule: under 60 s on 2 CPU cores."),
    seed: int = typer.Option(0, "--seed", help="Seed for data generation and training; same seed, same numbers."),
) -> None:
    """Generate the synthetic RGB-D dataset, train a CAM network from scratch, make CAM
    pseudo-labels at the best background threshold and evaluate them (J, F, J&F, boundary IoU)."""
    from weakseg.steps import demo as demo_step

    demo_step.run(out, quick=quick, seed=seed)


@app.command("eval")
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="Folder of predicted PNG label maps (255 = no prediction)."),
    gt: Path = typer.Option(..., "--gt", help="Folder of ground-truth PNG label maps (255 = void); matched by file stem."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Text file, one class name per line (line i = id i). Default: ids 0..max seen."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON here."),
    background: bool = typer.Option(True, "--background/--no-background", help="Class 0 is background (left out of the mean contour F)."),
) -> None:
    """Evaluate predicted label maps: J (mIoU), contour F, J&F, boundary IoU, precision, recall."""
    from weakseg.steps import evaluate as evaluate_step

    with progress_bar() as bars:
        task = bars.add_task("evaluate", total=None)
        summary = evaluate_step.run(
            pred, gt, classes, json_out, background, on_image=lambda i, n: bars.update(task, completed=i, total=n)
        )
    out_console.print(_metrics_table(summary, f"{summary['num_images']} images"))
    out_console.print("classes absent from both ground truth and prediction: n/a, left out of the means")
    if json_out is not None:
        out_console.print(f"wrote {json_out}")


@data_app.command("check")
def data_check(config: Path = typer.Argument(..., help="Dataset config YAML (kind: voc|folder|nyu|coco|synthetic + its keys).")) -> None:
    """Load every sample of a dataset and report each broken file, one line per problem."""
    from weakseg.data import dataset_from_file

    dataset = dataset_from_file(config, strict=False)
    with progress_bar() as bars:
        task = bars.add_task(f"check {dataset.name}", total=len(dataset))
        problems = dataset.check(progress=lambda i, n: bars.update(task, completed=i))
    if problems:
        for problem in problems:
            typer.echo(f"ERROR {problem}", err=False)
        typer.echo(f"{len(problems)} problem(s) in {dataset.name}")
        raise typer.Exit(code=1)
    typer.echo(
        f"OK: {len(dataset)} samples, {dataset.num_classes} classes"
        f" ({', '.join(dataset.class_names[:6])}{', ...' if dataset.num_classes > 6 else ''})"
    )


def main() -> None:
    try:
        app()
    except WeaksegError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
