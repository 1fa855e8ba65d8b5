"""`write_report`: one self-contained HTML page comparing `weakseg run` folders.

The page holds, for every run: J, F, J&F and boundary IoU of each stage and the seconds of
each step (results.json), per-class IoU bars of the final network (evaluate/metrics.json), a
J-vs-F scatter across runs, and overlays of the first images: image | CAM | pseudo-label |
prediction | ground truth. It references nothing outside itself (inline CSS and SVG,
images as base64 PNG data URIs), so it can be mailed or archived as one file.

A run that stopped early (`--to`) still renders what it has: missing stages print "—" and
missing files leave an empty overlay cell with the reason.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from weakseg.config import load_yaml
from weakseg.data import build_dataset
from weakseg.data.base import SegDataset
from weakseg.data.io import read_label_map, voc_palette, write_text_atomic
from weakseg.errors import DataError, WeaksegError
from weakseg.steps import STEP_NAMES, stages_and_seconds
from weakseg.labels import IGNORE
from weakseg.report.overlays import blend, colorize_labels, heatmap
from weakseg.report.plots import ScatterPoint, iou_bars_svg, is_missing, jf_scatter_svg, percent

# The stages of results.json["stages"], in pipeline order (docs/pipeline.md).
STAGES = ("cam", "refined", "pseudo_labels", "final")
# results.json key -> column title.
METRICS = (("miou", "J"), ("contour_f", "F"), ("jf", "J&F"), ("boundary_iou", "boundary IoU"))
OVERLAY_COLUMNS = ("image", "CAM", "pseudo-label", "prediction", "ground truth")
THUMB_WIDTH = 160
# Opacity of a label map blended over its image: high enough that class colours are
# recognisable against the legend, low enough that the image shows through.
LABEL_ALPHA = 0.6
MISSING_STAGE = "—"

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)

CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; font-size: 14px; color: #222; margin: 24px; max-width: 1150px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.missing-stage { color: #999; text-align: center; }
.note { color: #8a5a00; }
.path { color: #666; font-size: 12px; }
svg text { font-family: "DejaVu Sans", Arial, sans-serif; font-size: 12px; fill: #222; }
svg text.na { fill: #999; font-style: italic; }
svg text.point-label { font-size: 11px; fill: #333; }
table.overlays td { vertical-align: top; text-align: center; padding: 2px; }
table.overlays img { display: block; }
div.empty-cell { width: 160px; height: 60px; color: #999; font-size: 12px; display: flex; align-items: center; justify-content: center; }
.caption { font-size: 12px; text-align: left; max-width: 160px; }
span.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #888; vertical-align: middle; margin: 0 3px 0 10px; }
"""


@dataclass
class Run:
    path: Path
    name: str
    results: dict
    final_metrics: dict | None = None
    dataset: SegDataset | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def stages(self) -> dict:
        stages = self.results.get("stages")
        return stages if isinstance(stages, dict) else {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(path, "must hold a JSON object")
    return data


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read what a folder of weakseg outputs has: a run folder (results.json, or only the
    step folders that the single-step commands wrote), or one step folder (RUN/infer_cam).
    Everything beyond one finished step is optional; what is absent becomes a note."""
    path = Path(path)
    results_path = path / "results.json"
    if results_path.is_file():
        run = Run(path=path, name=name or path.name, results=_read_json(results_path))
    else:
        if (path / "done.json").is_file() and path.name in STEP_NAMES:
            step_dirs, root = [path], path.parent  # one step folder; the run is its parent
        else:
            step_dirs, root = [path / s for s in STEP_NAMES if (path / s / "done.json").is_file()], path
        if not step_dirs:
            raise DataError(path, "no weakseg outputs here: neither results.json nor a finished step folder "
                                  f"({', '.join(STEP_NAMES)}, each with done.json)")
        done = {d.name: _read_json(d / "done.json") for d in step_dirs}
        run = Run(path=root, name=name or path.name, results=stages_and_seconds(done))
        run.notes.append(f"no results.json: read from the finished step folder(s) {', '.join(d.name for d in step_dirs)}")
        path = root
    metrics_path = path / "evaluate" / "metrics.json"
    if metrics_path.is_file():
        run.final_metrics = _read_json(metrics_path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        run.notes.append("no config.yaml, so no dataset: class names come from metrics.json and there are no overlays")
        return run
    try:
        mapping = load_yaml(config_path).get("dataset")
        # The saved config names its data by absolute paths, so this works from anywhere.
        run.dataset = build_dataset(mapping)
    except (WeaksegError, OSError) as exc:
        run.notes.append(f"the run's dataset could not be loaded, so there are no overlays: {exc}")
    return run


def _display_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, with the parent folder added where two runs share a name (runs/a/run and
    runs/b/run), and a counter where even that is not enough."""
    plain = [p.name or str(p) for p in paths]
    names = [f"{p.parent.name}/{name}" if plain.count(name) > 1 else name for p, name in zip(paths, plain)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(f"{name} ({seen[name]})" if names.count(name) > 1 else name)
    return unique


# --- images ---------------------------------------------------------------------------------


def _png_data_uri(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumb_size(shape: tuple[int, ...]) -> tuple[int, int]:
    height, width = shape[:2]
    return THUMB_WIDTH, max(1, round(height * THUMB_WIDTH / width))


def _resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def _resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # Nearest neighbour: interpolating class ids would invent classes along the edges.
    return np.asarray(Image.fromarray(np.asarray(label, dtype=np.uint8)).resize(size, Image.NEAREST))


def _resize_scalar(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(values, dtype=np.float32), mode="F").resize(size, Image.BILINEAR))


def _label_overlay(thumb: np.ndarray, label: np.ndarray) -> np.ndarray:
    return blend(thumb, colorize_labels(_resize_label(label, (thumb.shape[1], thumb.shape[0]))), LABEL_ALPHA)


def _cam_overlay(thumb: np.ndarray, cam_path: Path) -> np.ndarray:
    """The max over the image's present classes of its CAMs (infer-cam stores only those,
    (P, H, W) in [0, 1]), as a heat map over the image. An image with no present class has
    P = 0 and shows a CAM of 0 everywhere."""
    try:
        with np.load(cam_path) as data:
            cams = np.asarray(data["cams"], dtype=np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(cam_path, f"cannot read the CAMs ({exc})") from None
    if cams.ndim != 3:
        raise DataError(cam_path, f"'cams' must be (P, H, W), got shape {cams.shape}")
    strongest = cams.max(axis=0) if len(cams) else np.zeros(cams.shape[1:], np.float32)
    return blend(thumb, heatmap(_resize_scalar(strongest, (thumb.shape[1], thumb.shape[0]))), 0.5)


def _img(rgb: np.ndarray, column: str, sample_id: str) -> str:
    return (
        f'<img class="thumb" data-column="{escape(column)}" width="{rgb.shape[1]}" height="{rgb.shape[0]}" '
        f'alt="{escape(column)} of {escape(sample_id)}" src="{_png_data_uri(rgb)}">'
    )


def _empty(reason: str) -> str:
    return f'<div class="empty-cell">{escape(reason)}</div>'


# --- sections -------------------------------------------------------------------------------


def _metrics_table(runs: Sequence[Run]) -> str:
    rows = [
        "<table class='metrics'><tr><th>run</th><th>stage</th>"
        + "".join(f"<th>{escape(title)} (%)</th>" for _, title in METRICS)
        + "</tr>"
    ]
    for run in runs:
        for i, stage in enumerate(STAGES):
            cells = []
            if i == 0:
                cells.append(f"<th rowspan='{len(STAGES)}'>{escape(run.name)}</th>")
            cells.append(f"<td>{escape(stage)}</td>")
            values = run.stages.get(stage)
            for key, _ in METRICS:
                attrs = f'data-run="{escape(run.name)}" data-stage="{stage}" data-metric="{key}"'
                if not isinstance(values, dict):
                    cells.append(f'<td class="missing-stage" {attrs}>{MISSING_STAGE}</td>')
                else:
                    cells.append(f'<td class="num" {attrs}>{percent(values.get(key))}</td>')
            rows.append(f"<tr>{''.join(cells)}</tr>")
    rows.append("</table>")
    extras = []
    for run in runs:
        facts = []
        if "evaluated_on" in run.results:
            facts.append(f"final evaluated on {escape(str(run.results['evaluated_on']))}")
        if run.results.get("cam_threshold") is not None:
            facts.append(f"CAM background threshold {escape(str(run.results['cam_threshold']))}")
        labels = run.results.get("pseudo_labels")
        if isinstance(labels, dict) and labels.get("coverage") is not None:
            facts.append(f"pseudo-label coverage {percent(labels['coverage'])} %")
        if facts:
            extras.append(f"<li><b>{escape(run.name)}</b>: {'; '.join(facts)}</li>")
    notes = f"<ul>{''.join(extras)}</ul>" if extras else ""
    return (
        "<section id='metrics'><h2>Metrics per stage</h2>"
        "<p>J = mIoU, F = contour F-measure, J&amp;F = their mean, boundary IoU; in %. "
        f"{MISSING_STAGE} = the run stopped before this stage; n/a = not defined.</p>"
        + "".join(rows)
        + notes
        + "</section>"
    )


def _seconds_table(runs: Sequence[Run]) -> str:
    present = {step for run in runs for step in (run.results.get("seconds") or {})}
    steps = [s for s in STEP_NAMES if s in present] + sorted(present - set(STEP_NAMES))
    rows = ["<table class='seconds'><tr><th>run</th>" + "".join(f"<th>{escape(s)}</th>" for s in steps) + "<th>total</th></tr>"]
    for run in runs:
        seconds = run.results.get("seconds") or {}
        cells = []
        for step in steps:
            value = seconds.get(step)
            attrs = f'data-run="{escape(run.name)}" data-step="{escape(step)}"'
            if isinstance(value, (int, float)):
                cells.append(f'<td class="num" {attrs}>{value:.1f}</td>')
            else:
                cells.append(f'<td class="missing-stage" {attrs}>{MISSING_STAGE}</td>')
        total = sum(v for v in seconds.values() if isinstance(v, (int, float)))
        rows.append(f"<tr><th>{escape(run.name)}</th>{''.join(cells)}<td class='num'>{total:.1f}</td></tr>")
    rows.append("</table>")
    return "<section id='seconds'><h2>Seconds per step</h2>" + "".join(rows) + "</section>"


def _scatter(runs: Sequence[Run]) -> str:
    points = []
    for run in runs:
        for stage in STAGES:
            values = run.stages.get(stage)
            if isinstance(values, dict) and not is_missing(values.get("miou")) and not is_missing(values.get("contour_f")):
                points.append(ScatterPoint(run.name, stage, float(values["contour_f"]), float(values["miou"])))
    body = jf_scatter_svg(points, STAGES) if points else "<p class='note'>no stage has both J and F</p>"
    return (
        "<section id='scatter'><h2>J against F</h2>"
        "<p>One point per run and stage; a grey line joins a run's stages in pipeline order.</p>"
        + body
        + "</section>"
    )


def _per_class_names_values(run: Run) -> tuple[list[str], list[float | None]] | None:
    """evaluate/metrics.json's per_class_iou (a {class name: IoU or null} mapping, as
    SegEvaluator writes it; a list indexed by class id is accepted too), in the dataset's
    class order."""
    if run.final_metrics is None or "per_class_iou" not in run.final_metrics:
        return None
    per_class = run.final_metrics["per_class_iou"]
    known = list(run.dataset.class_names) if run.dataset is not None else []
    if isinstance(per_class, list):
        names = [known[i] if i < len(known) else f"class {i}" for i in range(len(per_class))]
        values = list(per_class)
    elif isinstance(per_class, dict):
        names = [n for n in known if n in per_class] + [n for n in per_class if n not in known]
        values = [per_class[n] for n in names]
    else:
        raise DataError(run.path / "evaluate" / "metrics.json", "per_class_iou must be a mapping or a list")
    values = [None if is_missing(v) else float(v) for v in values]
    return names, values


def _per_class(runs: Sequence[Run]) -> str:
    parts = ["<section id='per-class'><h2>Per-class IoU of the final network</h2>"
             "<p>Bar length = IoU (full track = 100 %). n/a = the class occurs neither in the "
             "ground truth nor in the predictions.</p>"]
    for run in runs:
        parts.append(f"<h3>{escape(run.name)}</h3>")
        found = _per_class_names_values(run)
        if found is None:
            parts.append("<p class='note'>no evaluate/metrics.json with per_class_iou (the run stopped before "
                         "<code>evaluate</code>, or its evaluation data has no masks)</p>")
        else:
            parts.append(iou_bars_svg(*found))
    parts.append("</section>")
    return "".join(parts)


def _legend(dataset: SegDataset) -> str:
    items = []
    for class_id, name in enumerate(dataset.class_names):
        r, g, b = _PALETTE[class_id]
        items.append(f'<span class="swatch" data-class-id="{class_id}" style="background: rgb({r}, {g}, {b})"></span>{escape(name)}')
    r, g, b = _PALETTE[IGNORE]
    items.append(
        f'<span class="swatch" data-class-id="{IGNORE}" style="background: rgb({r}, {g}, {b})"></span>'
        "unconfident / ignore (255)"
    )
    return f"<p class='legend'>{''.join(items)}</p>"


# How many images the default overlay choice looks at for classes not shown yet.
OVERLAY_SCAN = 100


def overlay_indices(dataset: SegDataset, max_images: int, ids: Sequence[str] | None = None) -> list[int]:
    """Which images the overlays show: the given ids (in that order), or else up to
    `max_images` images that together cover as many classes as possible: in dataset order,
    an image is taken when it has a class no image taken so far has (among the first
    OVERLAY_SCAN images), and the rest are filled in dataset order."""
    if ids:
        where = {sample_id: i for i, sample_id in enumerate(dataset.ids)}
        unknown = [i for i in ids if i not in where]
        if unknown:
            raise WeaksegError(f"--ids: {', '.join(map(repr, unknown))} not in {dataset.name}")
        return [where[i] for i in ids]
    chosen: list[int] = []
    shown: set[int] = set()
    for index in range(min(OVERLAY_SCAN, len(dataset))):
        if len(chosen) == max_images:
            break
        classes = set(dataset[index].present_class_ids)
        if classes - shown:
            chosen.append(index)
            shown |= classes
    rest = (i for i in range(len(dataset)) if i not in chosen)
    while len(chosen) < min(max_images, len(dataset)):
        chosen.append(next(rest))
    return chosen


def _overlay_rows(run: Run, max_images: int, ids: Sequence[str] | None = None) -> str:
    dataset = run.dataset
    assert dataset is not None
    rows = ["<tr><th>id</th>" + "".join(f"<th>{escape(c)}</th>" for c in OVERLAY_COLUMNS) + "</tr>"]
    for index in overlay_indices(dataset, max_images, ids):
        sample = dataset[index]
        sid = sample.id
        thumb = _resize_image(sample.image, _thumb_size(sample.image.shape))
        cells = [_img(thumb, "image", sid)]
        cam_path = run.path / "infer_cam" / "cams" / f"{sid}.npz"
        cells.append(_img(_cam_overlay(thumb, cam_path), "CAM", sid) if cam_path.is_file() else _empty("no CAM file"))
        for column, path in (
            ("pseudo-label", run.path / "pseudo_labels" / "labels" / f"{sid}.png"),
            # Absent when predict ran on another eval_dataset, or the run stopped earlier.
            ("prediction", run.path / "predict" / "pred" / f"{sid}.png"),
        ):
            cells.append(_img(_label_overlay(thumb, read_label_map(path)), column, sid) if path.is_file() else _empty(f"no {column}"))
        if sample.mask is not None:
            cells.append(_img(_label_overlay(thumb, sample.mask), "ground truth", sid))
        else:
            cells.append(_empty("no mask"))
        present = ", ".join(sample.class_names[c] for c in sample.present_class_ids) or "no class"
        caption = f"<td class='caption'>{escape(sid)}<br><span class='path'>{escape(present)}</span></td>"
        rows.append("<tr>" + caption + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table class='overlays' data-run=\"{escape(run.name)}\">{''.join(rows)}</table>"


def _overlays(runs: Sequence[Run], max_images: int, ids: Sequence[str] | None = None) -> str:
    chosen = ("The images asked for (--ids)." if ids else
              f"Up to {max_images} image{'' if max_images == 1 else 's'} of each run's dataset, chosen in dataset order to "
              "show as many classes as possible (--ids chooses them).")
    parts = ["<section id='overlays'><h2>Overlays</h2>"
             f"<p>{chosen} CAM: the strongest CAM of the "
             "image's classes, blue (0) to red (1). Label maps are blended over the image in the "
             "VOC colours.</p>"]
    for run in runs:
        parts.append(f"<h3>{escape(run.name)}</h3>")
        if run.dataset is None:
            parts.append("<p class='note'>no dataset, no overlays (see the note above)</p>")
            continue
        parts.append(_legend(run.dataset))
        parts.append(_overlay_rows(run, max_images, ids))
    parts.append("</section>")
    return "".join(parts)


def render_report(runs: Sequence[Run], max_images: int = 6, ids: Sequence[str] | None = None) -> str:
    """The whole page as a string."""
    run_list = "".join(
        f"<li><b>{escape(run.name)}</b> <span class='path'>{escape(str(run.path.resolve()))}</span>"
        + "".join(f"<br><span class='note'>{escape(note)}</span>" for note in run.notes)
        + "</li>"
        for run in runs
    )
    body = (
        "<h1>weakseg report</h1>"
        f"<ul class='runs'>{run_list}</ul>"
        + _metrics_table(runs)
        + _scatter(runs)
        + _per_class(runs)
        + _seconds_table(runs)
        + (_overlays(runs, max_images, ids) if max_images > 0 or ids else "")
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>weakseg report: {escape(', '.join(run.name for run in runs))}</title>"
        f"<style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def write_report(run_dirs: Sequence[str | Path], out: str | Path, max_images: int = 6,
                 ids: Sequence[str] | None = None) -> Path:
    """Write the HTML report of `run_dirs` to `out` (atomically) and return `out`. Each is a
    folder of weakseg outputs (see `load_run`); `ids` chooses the overlay images.

    Raises DataError for a folder with no weakseg outputs, before anything is written."""
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise WeaksegError("weakseg report: give at least one run folder")
    if max_images < 0:
        raise WeaksegError(f"--max-images must be 0 or more, got {max_images}")
    runs = [load_run(path, name) for path, name in zip(paths, _display_names(paths))]
    out = Path(out)
    write_text_atomic(out, render_report(runs, int(max_images), ids))
    return out
