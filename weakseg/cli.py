"""The `weakseg` command line. Each command parses its arguments and calls one step."""

from __future__ import annotations

import math
import os
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
    classes: Optional[Path] = typer.Option(None, "--classes", help="Text file, one class name per line (line i = id i). Default: ids 0..max seen."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON here."),
    background: bool = typer.Option(True, "--background/--no-background", help="Class 0 is background (left out of the mean contour F)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Processes that read and score the images (default: one per core); the numbers do not depend on it."),
) -> None:
    """Evaluate predicted label maps: J (mIoU), contour F, J&F, boundary IoU, precision, recall."""
    from weakseg.steps import evaluate as evaluate_step

    with progress_bar() as bars:
        task = bars.add_task("evaluate", total=None)
        summary = evaluate_step.run(
            pred, gt, classes, json_out, background, on_image=lambda i, n: bars.update(task, completed=i, total=n),
            workers=workers,
        )
    out_console.print(_metrics_table(summary, f"{summary['num_images']} images"))
    out_console.print("classes absent from both ground truth and prediction: n/a, left out of the means")
    if json_out is not None:
        out_console.print(f"wrote {json_out}")


@app.command("train-cam", context_settings={"allow_extra_args": False})
def train_cam(
    config: Path = typer.Argument(..., help="Training YAML: dataset, model, loss, train, infer, out."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.epochs=2 loss.fsl.weight=0.5"),
) -> None:
    """Train a CAM network with the configured loss terms (GAP, ISL, FSL, DEAL); writes
    OUT/cam_model.pt, a checkpoint per epoch and OUT/log.csv with every loss term."""
    from weakseg.steps import train_cam as step

    with progress_bar() as bars:
        task = bars.add_task("train CAM", total=None)
        result = step.run(config, overrides or [], on_step=lambda i, n: bars.update(task, completed=i, total=n))
    losses = ", ".join(f"{v:.4f}" for v in result["epoch_losses"])
    out_console.print(f"trained: epoch losses [{losses}] -> {result['cam_model']}")


@app.command("infer-cam")
def infer_cam(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="cam_model.pt written by train-cam."),
    data: Path = typer.Option(..., "--data", help="Dataset config YAML."),
    out: Path = typer.Option(..., "--out", help="Output folder: cams/, pseudo_labels/, cam_metrics.json."),
    scales: str = typer.Option("0.5,1.0,1.5,2.0", "--scales", help="Comma-separated test-time scales."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Add horizontally flipped inputs."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Background threshold when the dataset has no masks (default 0.25)."),
    activation: str = typer.Option("relu", "--activation", help="relu (CAM convention) or sigmoid (binomial posterior) on the class scores."),
    output: Optional[str] = typer.Option(None, "--output", help="Model output to read (default: the method's inference_output, e.g. SEAM's cams_pcm; cams for SEAM's raw CAM)."),
) -> None:
    """Multi-scale + flip CAMs for every image, pseudo-labels at the best background threshold,
    and CAM metrics (J, F, J&F, best threshold) when the dataset has masks."""
    from weakseg.steps import infer_cam as step

    try:
        scale_values = [float(s) for s in scales.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--scales: expected numbers separated by commas, got {scales!r}") from None
    with progress_bar() as bars:
        task = bars.add_task("infer CAMs", total=None)
        result = step.run(checkpoint, data, out, scale_values, flip, threshold,
                          on_image=lambda i, n: bars.update(task, completed=i, total=n), activation=activation,
                          output=output)
    if "miou" in result:
        out_console.print(
            f"CAM: J={_fmt(result['miou'])}  F={_fmt(result['contour_f'])}  J&F={_fmt(result['jf'])}  "
            f"best threshold={result['best_threshold']:.2f} -> {out / 'cam_metrics.json'}"
        )
    else:
        out_console.print(f"CAMs and pseudo-labels for {result['num_images']} images -> {out}")


@app.command("run")
def run_pipeline(
    config: Path = typer.Argument(..., help="Pipeline YAML: dataset, cam, refine, pseudo_labels, seg, out."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. seg.train.epochs=2"),
    from_step: Optional[str] = typer.Option(None, "--from", help="Re-run this step and all after it: cam_train, cam, refined, pseudo_labels, seg_train, final."),
    to_step: Optional[str] = typer.Option(None, "--to", help="Stop after this step (e.g. --to refined to compare refiners); results.json then holds the stages so far."),
) -> None:
    """The whole pipeline: train CAM -> infer CAMs -> refine -> pseudo-labels -> train the
    segmentation network -> predict -> evaluate. Each step writes its own folder of OUT and is
    skipped when it finished earlier with the same config; OUT/results.json has J, F, J&F and
    boundary IoU per stage."""
    from weakseg.steps import pipeline

    with progress_bar() as bars:
        tasks: dict = {}

        def progress(step: str):
            def update(i: int, n: int) -> None:
                if step not in tasks:
                    tasks[step] = bars.add_task(step, total=n)
                bars.update(tasks[step], completed=i, total=n)

            return update

        summary = pipeline.run(config, overrides or [], from_step, log=lambda m: console.print(m), progress=progress,
                               to_step=to_step)
    table = Table(title=f"results ({summary['evaluated_on']})")
    for column in ("stage", "J", "F", "J&F", "boundary IoU"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage, values in summary["stages"].items():
        table.add_row(stage, *(_fmt(values.get(k)) for k in ("miou", "contour_f", "jf", "boundary_iou")))
    out_console.print(table)


@app.command("sweep", context_settings={"ignore_unknown_options": True})
def sweep_command(
    config: Path = typer.Argument(..., help="Pipeline YAML (with cam:) or CAM training YAML (with model:)."),
    args: Optional[list[str]] = typer.Argument(
        None, metavar="--seeds S [S ...] [KEY=V1,V2 ...]",
        help="--seeds 0 1 2 (required), then grid items: key=v1,v2 runs every value, e.g. refine.method=crf,pamr "
             "cam.infer.scales=[0.5,1.0],[1.0] (commas inside brackets do not split)."),
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
    run_dirs: list[Path] = typer.Argument(..., help="Run folders of `weakseg run` (each holding results.json)."),
    out: Path = typer.Option(..., "--out", help="The HTML file to write (self-contained: no scripts, no links)."),
    max_images: int = typer.Option(6, "--max-images", min=0, help="Overlay rows per run: its dataset's first N images (0: none)."),
) -> None:
    """One self-contained HTML page comparing run folders: J, F, J&F and boundary IoU per stage,
    a J-vs-F scatter, per-class IoU bars, step seconds and overlays (image, CAM, pseudo-label,
    prediction, ground truth)."""
    from weakseg.report import write_report

    out_console.print(f"wrote {write_report(run_dirs, out, max_images=max_images)}", markup=False, highlight=False)


@app.command("refine")
def refine_cams(
    cams: Path = typer.Option(..., "--cams", help="infer-cam output folder (holding cams/<id>.npz)."),
    data: Path = typer.Option(..., "--data", help="Dataset config YAML."),
    out: Path = typer.Option(..., "--out", help="Output folder: probs/<id>.npz and refined_metrics.json."),
    method: str = typer.Option("crf", "--method", help="none, crf, pamr or spr (affinity_rw trains a network: use weakseg run)."),
    background: str = typer.Option("power", "--background", help="power, constant or model (see docs/pipeline.md)."),
    alpha: float = typer.Option(1.0, "--alpha", help="Background power: score (1 - max cam)^alpha."),
    constant: float = typer.Option(0.25, "--constant", help="Constant background score (--background constant)."),
    crf_preset: str = typer.Option("psa", "--crf-preset", help="Dense-CRF preset: psa or label."),
) -> None:
    """Refine CAMs into per-pixel probabilities (dense CRF, PAMR, SPR) and score their argmax
    (J, F, J&F, boundary IoU) when the dataset has masks."""
    from weakseg.config import from_mapping
    from weakseg.data import dataset_from_file
    from weakseg.steps import refine as step

    config = from_mapping(step.RefineConfig, {"method": method, "background": background, "background_alpha": alpha,
                                              "background_constant": constant, "crf_preset": crf_preset}, "refine")
    dataset = dataset_from_file(data)
    with progress_bar() as bars:
        task = bars.add_task(f"refine ({method})", total=None)
        result = step.run(dataset, cams, out, config, on_image=lambda i, n: bars.update(task, completed=i, total=n))
    if "miou" in result:
        out_console.print(f"refined: J={_fmt(result['miou'])}  F={_fmt(result['contour_f'])}  J&F={_fmt(result['jf'])}  "
                          f"boundary IoU={_fmt(result['boundary_iou'])} -> {out / 'refined_metrics.json'}")
    else:
        out_console.print(f"refined probabilities for {result['num_images']} images -> {out / 'probs'}")


@app.command("train-seg")
def train_seg(
    config: Path = typer.Argument(..., help="YAML with dataset, labels (a folder holding labels/<id>.png), model, train, out."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.epochs=2"),
) -> None:
    """Train the DeepLab-style segmentation network (ASPP on any backbone) on pseudo-labels,
    255 ignored; writes OUT/seg_model.pt, a checkpoint per epoch and OUT/log.csv."""
    from weakseg.steps import train_seg as step

    with progress_bar() as bars:
        task = bars.add_task("train segmentation", total=None)
        result = step.run_file(config, overrides or [], on_step=lambda i, n: bars.update(task, completed=i, total=n))
    losses = ", ".join(f"{v:.4f}" for v in result["epoch_losses"])
    out_console.print(f"trained: epoch losses [{losses}] -> {result['seg_model']}")


@app.command("predict")
def predict(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="seg_model.pt written by train-seg."),
    data: Path = typer.Option(..., "--data", help="Dataset config YAML."),
    out: Path = typer.Option(..., "--out", help="Output folder: pred/<id>.png and metrics.json."),
    scales: str = typer.Option("0.5,1.0,1.5,2.0", "--scales", help="Comma-separated test-time scales."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Add horizontally flipped inputs."),
    crf: Optional[str] = typer.Option(None, "--crf", help="Dense-CRF preset applied to the predictions: psa or label."),
) -> None:
    """Segment every image (multi-scale + flip softmax, optional dense CRF) and evaluate
    J, F, J&F and boundary IoU when the dataset has masks."""
    from weakseg.data import dataset_from_file
    from weakseg.steps import predict as step

    try:
        scale_values = [float(s) for s in scales.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--scales: expected numbers separated by commas, got {scales!r}") from None
    dataset = dataset_from_file(data)
    with progress_bar() as bars:
        task = bars.add_task("predict", total=None)
        result = step.run(checkpoint, dataset, out, step.SegInferConfig(scale_values, flip, crf),
                          on_image=lambda i, n: bars.update(task, completed=i, total=n))
    if "miou" in result:
        out_console.print(f"J={_fmt(result['miou'])}  F={_fmt(result['contour_f'])}  J&F={_fmt(result['jf'])}  "
                          f"boundary IoU={_fmt(result['boundary_iou'])} -> {out / 'metrics.json'}")
    else:
        out_console.print(f"predictions for {result['num_images']} images -> {out / 'pred'}")


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
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
