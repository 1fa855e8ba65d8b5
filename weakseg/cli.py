"""The `weakseg` command line. Each command parses its arguments and calls one step."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from weakseg.errors import ConfigError, WeaksegError
from weakseg.progress import StepProgress, console, progress_bar
from weakseg.steps import STEP_NAMES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Weakly supervised semantic segmentation from image-level labels.",
)
# Results go to stdout; progress and errors to stderr. Under torchrun only rank 0 prints
# results (every rank runs the command).
out_console = Console(quiet=int(os.environ.get("RANK", "0")) != 0)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate datasets; estimate depth maps for them.")
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
    classes: Optional[Path] = typer.Option(None, "--classes", help="Text file, one class name per line (line i = id i). Default: the --data dataset's, else ids 0..max seen."),
    data: Optional[Path] = typer.Option(None, "--data", help="A dataset config (or a pipeline config with `dataset:`): its class names and its background class (or none) are used."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON here."),
    background: Optional[bool] = typer.Option(None, "--background/--no-background", help="Class 0 is background (left out of the mean contour F), or there is none. Default: the --data dataset's setting, else class 0 (an assumption, printed and stored in the JSON)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Processes that read and score the images (default: one per core); the numbers do not depend on it."),
) -> None:
    """Evaluate predicted label maps: J (mIoU), contour F, J&F, boundary IoU, precision, recall."""
    from weakseg.steps import evaluate as evaluate_step

    class_names, background_index, source = None, None, None
    if data is not None:
        from weakseg.data import dataset_from_file

        if classes is not None:
            raise ConfigError("--classes and --data both name the classes; give one")
        dataset = dataset_from_file(data, strict=False)
        class_names, background_index = list(dataset.class_names), dataset.background_index
        source = f"the dataset of {data}"
    if background is not None:
        background_index = 0 if background else None
        source = "--background" if background else "--no-background"
    elif source is None:
        background_index, source = 0, "assumed (no --data, --background or --no-background given)"
    with progress_bar() as bars:
        task = bars.add_task("evaluate", total=None)
        summary = evaluate_step.run(
            pred, gt, classes, json_out, background_index, on_image=lambda i, n: bars.update(task, completed=i, total=n),
            workers=workers, class_names=class_names, background_source=source,
        )
    out_console.print(_metrics_table(summary, f"{summary['num_images']} images"))
    named = summary["background_class"]
    out_console.print(f"background: {'none (every class counts in F)' if named is None else repr(named) + ' (left out of F)'}"
                      f", {source}")
    out_console.print("classes absent from both ground truth and prediction: n/a, left out of the means")
    if json_out is not None:
        out_console.print(f"wrote {json_out}")




class _StepCommand(TyperCommand):
    """A step command whose full help (what the step makes, its config keys and defaults) is
    built from the step itself when asked for, so that listing the commands stays fast."""

    step_name = ""

    def format_help(self, ctx, formatter):
        from weakseg.steps import pipeline
        from weakseg.steps.base import config_keys

        step = pipeline.BY_NAME[self.step_name]
        needs = step.reads_for(step.config())  # with the step's defaults (predict: train_seg)
        if needs:
            reads = (f"reads {', '.join(f'RUN/{name}' for name in needs)} (the steps before it, finished with "
                     "the same config)")
        else:
            reads = "reads only the dataset"
        keys = "\n".join(f"  {line}" for line in config_keys(step.config, step.name)) or "  (none yet)"
        self.help = (f"{step.summary}\n\nRuns the `{step.name}:` section of CONFIG into RUN/{step.name} (RUN: the "
                     f"config's `out`); {reads}. Resumes when interrupted.\n\n\b\nKeys (in CONFIG under "
                     f"`{step.name}:`, or as key=value):\n{keys}")
        return super().format_help(ctx, formatter)


def _log(message: str) -> None:
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _step_line(name: str, result: dict) -> str:
    if "miou" in result:
        return (f"{name}: J={_fmt(result['miou'])}  F={_fmt(result['contour_f'])}  J&F={_fmt(result['jf'])}  "
                f"boundary IoU={_fmt(result['boundary_iou'])}")
    if "final_loss" in result:
        return f"{name}: trained, final epoch loss {result['final_loss']:.4f}"
    return f"{name}: done" + (f" ({result['num_images']} images)" if "num_images" in result else "")


def _add_step_command(name: str) -> None:
    def step_command(
        config: Path = typer.Argument(..., help="Pipeline YAML: dataset, eval_dataset, out and one section per step."),
        overrides: Optional[list[str]] = typer.Argument(
            None, help=f"key=value overrides, keys as in the YAML, e.g. {name}.{'train.epochs=2' if name.startswith('train') else 'device=cpu'}"),
    ) -> None:
        from weakseg.steps import pipeline

        with progress_bar() as bars:
            result = pipeline.run_step(name, config, overrides or [], log=_log, progress=StepProgress(bars, name))
        out_console.print(_step_line(name, result), markup=False, highlight=False)

    step_command.__doc__ = f"Run the pipeline step {name} of CONFIG alone (--help: its keys)."
    command_class = type(f"_{name}_command", (_StepCommand,), {"step_name": name})
    app.command(name.replace("_", "-"), cls=command_class)(step_command)


for _name in STEP_NAMES:
    _add_step_command(_name)


@app.command("run")
def run_pipeline(
    config: Path = typer.Argument(..., help="Pipeline YAML: dataset, eval_dataset, out and one section per step."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train_seg.train.epochs=2"),
    from_step: Optional[str] = typer.Option(None, "--from", help=f"Re-run this step and all after it: {', '.join(STEP_NAMES)}."),
    to_step: Optional[str] = typer.Option(None, "--to", help="Stop after this step (e.g. --to refine to compare refiners); results.json then holds the stages so far."),
) -> None:
    """Every step the config has a section for, in order: train_cam -> infer_cam ->
    train_affinity -> refine -> pseudo_labels -> label_rounds -> train_seg -> predict -> evaluate. Each step
    writes RUN/<step> and is skipped when it finished earlier with the same config;
    RUN/results.json has J, F, J&F and boundary IoU per stage (cam, refined, pseudo_labels, final)."""
    from weakseg.steps import pipeline

    with progress_bar() as bars:
        summary = pipeline.run(config, overrides or [], from_step, log=_log, progress=lambda step: StepProgress(bars, step),
                               to_step=to_step)
    # cam, refined and pseudo_labels are always scored on the training images; the final
    # network on the eval_dataset when there is one.
    where = ("all stages on the training images" if summary["evaluated_on"] == "training images"
             else "final on the eval_dataset; cam, refined, pseudo_labels on the training images")
    table = Table(title=f"results ({where})")
    for column in ("stage", "J", "F", "J&F", "boundary IoU"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, values in summary["stages"].items():
        table.add_row(stage, *(_fmt(values.get(k)) for k in ("miou", "contour_f", "jf", "boundary_iou")))
    out_console.print(table)


@app.command("sweep", context_settings={"ignore_unknown_options": True})
def sweep_command(
    config: Path = typer.Argument(..., help="Pipeline YAML; each job is a `weakseg run` of it."),
    args: Optional[list[str]] = typer.Argument(
        None, metavar="--seeds S [S ...] [KEY=V1,V2 ...]",
        help="--seeds 0 1 2 (required), then grid items: key=v1,v2 runs every value, e.g. refine.method=crf,pamr "
             "infer_cam.scales=[0.5,1.0],[1.0] (commas inside brackets do not split)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Sweep folder (default: the config's out + _sweep)."),
) -> None:
    """Every combination of the grid values x every seed, one run each (finished runs are
    reused); OUT/sweep.json, sweep.csv and sweep.md hold mean ± sample std over the seeds."""
    from weakseg.steps import sweep

    seeds, items = sweep.split_cli_args(args or [])
    result = sweep.run(config, seeds, items, out, log=lambda m: console.print(m, markup=False, highlight=False))
    out_console.print(sweep.markdown_table(list(result["grid"]), result["combinations"]), markup=False,
                      highlight=False, soft_wrap=True)


@app.command("report")
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Folders of weakseg outputs: run folders (of `weakseg run` or of single-step commands) or step folders such as RUN/infer_cam."),
    out: Path = typer.Option(..., "--out", help="The HTML file to write (self-contained: no scripts, no links)."),
    max_images: int = typer.Option(6, "--max-images", min=0, help="Overlay rows per run: N images chosen in dataset order to show as many classes as possible (0: none)."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Comma-separated sample ids to show as overlays instead (in that order)."),
) -> None:
    """One self-contained HTML page comparing run folders: J, F, J&F and boundary IoU per stage,
    a J-vs-F scatter, per-class IoU bars, step seconds and overlays (image, CAM, pseudo-label,
    prediction, ground truth)."""
    from weakseg.report import write_report

    chosen = [i.strip() for i in ids.split(",") if i.strip()] if ids else None
    out_console.print(f"wrote {write_report(run_dirs, out, max_images=max_images, ids=chosen)}", markup=False,
                      highlight=False)


@data_app.command("check")
def data_check(config: Path = typer.Argument(..., help="Dataset config YAML (kind: voc|folder|nyu|coco|synthetic + its keys).")) -> None:
    """Load every sample of a dataset and report each broken file, one line per problem."""
    from weakseg.data import dataset_from_file

    dataset = dataset_from_file(config, strict=False)
    with progress_bar() as bars:
        task = bars.add_task(f"check {dataset.name}", total=len(dataset))
        counts: dict = {}
        problems = dataset.check(progress=lambda i, n: bars.update(task, completed=i), counts=counts)
    if problems:
        for problem in problems:
            typer.echo(f"ERROR {problem}", err=False)
        typer.echo(f"{len(problems)} problem(s) in {dataset.name}")
        raise typer.Exit(code=1)
    background = dataset.background_index
    typer.echo(
        f"OK: {len(dataset)} samples, {dataset.num_classes} classes"
        f" ({', '.join(dataset.class_names[:6])}{', ...' if dataset.num_classes > 6 else ''}); "
        f"background class: {'none' if background is None else repr(dataset.class_names[background])}; "
        f"masks: {counts['masks']} of {len(dataset)}; depth maps: {counts['depth']} of {len(dataset)}"
    )
    if dataset.absent_masks:
        typer.echo(f"note: {len(dataset.absent_masks)} image(s) have no mask (first: {dataset.absent_masks[0]}), "
                   "so no step can compute metrics; set dataset.require_masks: true to list them as errors")


def _three_floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) != 3:
        raise typer.BadParameter(f"{option}: expected 3 numbers (R,G,B) separated by commas, got {text!r}")
    return values


@data_app.command("depth")
def data_depth(
    config: Path = typer.Argument(..., help="Dataset config YAML whose images get a depth map."),
    model: str = typer.Option(..., "--model", help="TorchScript file (.pt/.ts), local Hugging Face depth-estimation model folder, or Python spec module:callable returning a torch module."),
    out: Path = typer.Option(..., "--out", help="Folder for <id>.npy depth maps and manifest.json; also the cache of earlier runs."),
    output: str = typer.Option("depth", "--output", help="What the model predicts: depth (larger = farther) or disparity (inverse depth, e.g. DPT, Depth Anything; converted)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Recompute every map, also when OUT holds maps of another model."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel input mean for torch modules, e.g. 0.485,0.456,0.406 (default: raw [0, 1] RGB)."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel input std for torch modules, e.g. 0.229,0.224,0.225."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the model, e.g. cpu or cuda."),
) -> None:
    """Estimate a depth map for every image of a dataset with a depth model and write
    OUT/<id>.npy (relative depth, larger = farther); valid maps of the same model are reused."""
    from weakseg.data import dataset_from_file
    from weakseg.data.depth_estimation import OUTPUTS, estimate_depth_folder, load_depth_model

    if output not in OUTPUTS:
        raise typer.BadParameter(f"--output: expected one of {', '.join(OUTPUTS)}, got {output!r}")
    mean_values, std_values = _three_floats(mean, "--mean"), _three_floats(std, "--std")
    dataset = dataset_from_file(config)
    depth_model = load_depth_model(model, device, output=output, mean=mean_values, std=std_values)
    with progress_bar() as bars:
        task = bars.add_task(f"depth {dataset.name}", total=len(dataset))
        result = estimate_depth_folder(
            dataset, depth_model, out, overwrite=overwrite, progress=lambda i, n: bars.update(task, completed=i)
        )
    location = out.resolve()
    typer.echo(
        f"wrote {len(result.written)} depth map(s), reused {len(result.reused)} from the cache -> {location} "
        f"({depth_model.kind} model {depth_model.content_hash[:19]}, output {output})"
    )
    if result.unlisted:
        typer.echo(f"note: {len(result.unlisted)} other .npy file(s) in {location} are not ids of this dataset; left untouched")
    typer.echo("units: the model's own (relative for most monocular estimators, not metres). To use the maps, add to a `folder` dataset config:")
    typer.echo(f"  depth_dir: {location}")
    typer.echo("  depth_scale: 1.0")


def main() -> None:
    try:
        app()
    except WeaksegError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        for note in getattr(exc, "__notes__", ()):
            console.print(escape(note), highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
