"""`weakseg report`: the HTML page of run folders shows the numbers of the run's files.

Two small pipeline runs are made once for the module (about 6 s on one thread): a complete
one and one stopped with --to refine. The page is parsed and compared, value by value,
with results.json, evaluate/metrics.json, the label maps and the dataset; headless Chromium
then renders it and the screenshot is checked for the charts and the thumbnails."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_pipeline import SMALL

from weakseg.data import build_dataset
from weakseg.data.io import read_label_map
from weakseg.errors import DataError, WeaksegError
from weakseg.report import write_report
from weakseg.report.html import OVERLAY_COLUMNS, STEP_NAMES
from weakseg.report.plots import STAGE_COLOURS, nice_ticks

STAGES = ("cam", "refined", "pseudo_labels", "final")
METRIC_KEYS = ("miou", "contour_f", "jf", "boundary_iou")
MAX_IMAGES = 3
# Reference colours of the PASCAL VOC colour map (the devkit's VOClabelcolormap), written out
# here rather than computed, so the report's palette is checked against the published values.
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 255: (224, 224, 192)}


# --- a small DOM over html.parser (no bs4 in the environment) ---------------------------------


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list = []  # Nodes and text strings

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children).strip()

    def iter(self):
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs) -> list["Node"]:
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        return [
            n for n in self.iter()
            if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
            and all(n.attrs.get(k) == v for k, v in wanted.items())
        ]

    def find(self, *args, **kwargs) -> "Node":
        found = self.find_all(*args, **kwargs)
        assert len(found) == 1, f"expected one match for {args} {kwargs}, got {len(found)}"
        return found[0]


class TreeBuilder(HTMLParser):
    VOID = {"img", "meta", "br", "hr", "input", "link"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#root", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None, f"</{tag}> closes nothing"
        self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(path: Path) -> Node:
    builder = TreeBuilder()
    builder.feed(path.read_text(encoding="utf-8"))
    builder.close()
    assert builder.current is builder.root, "unclosed element"
    return builder.root


def decode_png(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))).convert("RGB"))


def percent(value: float) -> str:
    """What the report promises: metrics in %, one decimal."""
    return f"{100 * value:.1f}"


# --- fixtures -------------------------------------------------------------------------------


def _make_run(folder: Path, name: str, to_step: str | None) -> Path:
    from weakseg.steps import pipeline

    config = json.loads(json.dumps(SMALL))
    # Few epochs: the report needs real files, not a good network.
    config["train_seg"]["train"]["epochs"] = 2
    config["out"] = str(folder / name)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    pipeline.run(path, log=lambda m: None, to_step=to_step)
    return folder / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, single_thread):
    folder = tmp_path_factory.mktemp("runs")
    return {"full": _make_run(folder, "full", None), "early": _make_run(folder, "early", "refine")}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    assert write_report([runs["full"], runs["early"]], out, max_images=MAX_IMAGES) == out
    return out


def results_of(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


# --- the page's values ----------------------------------------------------------------------


def test_metrics_table_shows_results_json(runs, report):
    table = parse(report).find("table", cls="metrics")
    header = [th.text() for th in table.find_all("tr")[0].find_all("th")]
    assert header == ["run", "stage", "J (%)", "F (%)", "J&F (%)", "boundary IoU (%)"]
    shown: dict = {}
    run_name = None
    for row in table.find_all("tr")[1:]:
        heads = row.find_all("th")
        if heads:  # the run's name spans its four stage rows
            run_name = heads[0].text()
        cells = [td.text() for td in row.find_all("td")]
        shown[(run_name, cells[0])] = cells[1:]
    assert set(shown) == {(run, stage) for run in ("full", "early") for stage in STAGES}
    for run in ("full", "early"):
        stages = results_of(runs[run])["stages"]
        for stage in STAGES:
            if stage in stages:
                assert shown[(run, stage)] == [percent(stages[stage][k]) for k in METRIC_KEYS]
            else:
                assert shown[(run, stage)] == ["—"] * 4
    # --to refine stopped before pseudo_labels and final: those rows are the "—" ones.
    assert set(results_of(runs["early"])["stages"]) == {"cam", "refined"}


def test_seconds_table_shows_each_step(runs, report):
    table = parse(report).find("table", cls="seconds")
    # A column per step that some run has (neither ran train_affinity), in pipeline order.
    present = [s for s in STEP_NAMES if any(s in results_of(runs[r])["seconds"] for r in ("full", "early"))]
    assert "train_affinity" not in present and len(present) == 7
    for run in ("full", "early"):
        seconds = results_of(runs[run])["seconds"]
        for step in present:
            cell = table.find("td", data_run=run, data_step=step)
            assert cell.text() == (f"{seconds[step]:.1f}" if step in seconds else "—")
    assert set(results_of(runs["early"])["seconds"]) == {"train_cam", "infer_cam", "refine"}


def test_step_order_is_the_pipelines():
    from weakseg.steps import pipeline

    assert STEP_NAMES == tuple(step.name for step in pipeline.STEPS)


def test_scatter_has_one_point_per_run_and_stage_at_its_j_and_f(runs, report):
    svg = parse(report).find("svg", cls="jf-scatter")
    points = svg.find_all("circle", cls="point")
    expected = {(run, stage) for run in ("full", "early") for stage in results_of(runs[run])["stages"]}
    assert len(expected) == 6
    assert sorted((p.attrs["data-run"], p.attrs["data-stage"]) for p in points) == sorted(expected)
    x0, x1, y0, y1 = (float(svg.attrs[k]) for k in ("data-x0", "data-x1", "data-y0", "data-y1"))
    left, top = float(svg.attrs["data-left"]), float(svg.attrs["data-top"])
    width, height = float(svg.attrs["data-plot-width"]), float(svg.attrs["data-plot-height"])
    for p in points:
        values = results_of(runs[p.attrs["data-run"]])["stages"][p.attrs["data-stage"]]
        # x = F, y = J (SVG y grows downwards), from results.json, not from the point's attributes.
        assert float(p.attrs["cx"]) == pytest.approx(left + (values["contour_f"] - x0) / (x1 - x0) * width, abs=0.01)
        assert float(p.attrs["cy"]) == pytest.approx(top + (1 - (values["miou"] - y0) / (y1 - y0)) * height, abs=0.01)
        assert x0 <= values["contour_f"] <= x1 and y0 <= values["miou"] <= y1
        assert p.attrs["fill"] == STAGE_COLOURS[p.attrs["data-stage"]]
    # Axes: increasing tick labels from the first to the last grid value; each run named once.
    x_ticks = [float(t.text()) for t in svg.find_all("text", cls="x-tick")]
    y_ticks = [float(t.text()) for t in svg.find_all("text", cls="y-tick")]
    assert len(x_ticks) >= 3 and len(y_ticks) >= 3
    assert x_ticks == sorted(x_ticks) and x_ticks[0] == x0 and x_ticks[-1] == x1
    assert y_ticks == sorted(y_ticks) and y_ticks[0] == y0 and y_ticks[-1] == y1
    assert sorted(t.text() for t in svg.find_all("text", cls="point-label")) == ["early", "full"]


def test_nice_ticks_cover_the_range_in_round_steps():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.12, 0.58) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    for low, high in ((0.31, 0.34), (0.05, 0.93), (0.5, 0.5), (0.7231, 0.7902)):
        ticks = nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and ticks[0] < ticks[-1]  # one point still gets an axis
        step = ticks[1] - ticks[0]
        assert np.allclose(np.diff(ticks), step)
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6
        assert 3 <= len(ticks) <= 7


def test_per_class_bars_are_proportional_to_the_final_iou(runs, report):
    page = parse(report)
    per_class = json.loads((runs["full"] / "evaluate" / "metrics.json").read_text())["per_class_iou"]
    config = yaml.safe_load((runs["full"] / "config.yaml").read_text())
    class_names = list(build_dataset(config["dataset"]).class_names)
    # Only the complete run has a final network; the early one gets a note instead of bars.
    svg = page.find("svg", cls="iou-bars")
    rows = svg.find_all("g", cls="iou-row")
    assert [r.find("text", cls="label").text() for r in rows] == class_names
    for row in rows:
        iou = per_class[row.attrs["data-class"]]
        assert iou is not None
        track, bar = row.find("rect", cls="track"), row.find("rect", cls="bar")
        assert float(bar.attrs["width"]) / float(track.attrs["width"]) == pytest.approx(iou, abs=1e-4)
        assert row.find("text", cls="value").text() == percent(iou)
    # One bar by hand: background's width is its IoU times the track width.
    background = svg.find("g", cls="iou-row", data_class="background")
    track_width = float(background.find("rect", cls="track").attrs["width"])
    assert float(background.find("rect", cls="bar").attrs["width"]) == pytest.approx(per_class["background"] * track_width, abs=0.006)
    section = page.find("section", id="per-class")
    assert "stopped before" in section.text()


def test_absent_class_is_na_not_zero(runs, tmp_path):
    run = tmp_path / "full"
    shutil.copytree(runs["full"], run)
    metrics_path = run / "evaluate" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["per_class_iou"]["ring"] = None  # as SegEvaluator writes an absent class
    metrics["per_class_iou"]["box"] = float("nan")  # and NaN, were a writer to keep it
    metrics_path.write_text(json.dumps(metrics))
    out = write_report([run], tmp_path / "r.html", max_images=0)
    svg = parse(out).find("svg", cls="iou-bars")
    for name in ("ring", "box"):
        row = svg.find("g", cls="iou-row", data_class=name)
        assert row.find_all("rect", cls="bar") == []
        assert row.find("text", cls="na").text() == "n/a"
    assert len(svg.find_all("rect", cls="bar")) == len(metrics["per_class_iou"]) - 2
    assert parse(out).find_all("table", cls="overlays") == []  # max_images=0: no overlays


def test_overlay_grid_has_five_columns_per_image_and_true_colours(runs, report):
    page = parse(report)
    config = yaml.safe_load((runs["full"] / "config.yaml").read_text())
    dataset = build_dataset(config["dataset"])
    full = page.find("table", cls="overlays", data_run="full")
    images = full.find_all("img", cls="thumb")
    assert len(images) == MAX_IMAGES * len(OVERLAY_COLUMNS)
    assert [img.attrs["data-column"] for img in images] == list(OVERLAY_COLUMNS) * MAX_IMAGES

    from weakseg.report.html import overlay_indices

    rows = full.find_all("tr")[1:]
    chosen = overlay_indices(dataset, MAX_IMAGES)
    assert len(rows) == len(chosen) == MAX_IMAGES
    for index, row in zip(chosen, rows):
        sample = dataset[index]
        assert row.find("td", cls="caption").text().startswith(sample.id)
        thumbs = {img.attrs["data-column"]: decode_png(img.attrs["src"]) for img in row.find_all("img")}
        h, w = sample.image.shape[:2]
        scale = 160 // w
        assert 160 % w == 0, "the synthetic images are 40 px, an integer fraction of the 160 px thumbnails"
        image = thumbs["image"].astype(np.float32)
        assert image.shape == (h * scale, 160, 3)

        def upscaled(label):  # nearest-neighbour at an integer factor = repeating each pixel
            return np.repeat(np.repeat(label, scale, axis=0), scale, axis=1)

        # Label columns: each pixel = 0.4 image + 0.6 VOC colour of its class (truncated).
        for column, label in (
            ("ground truth", sample.mask),
            ("pseudo-label", read_label_map(runs["full"] / "pseudo_labels" / "labels" / f"{sample.id}.png")),
            ("prediction", read_label_map(runs["full"] / "predict" / "pred" / f"{sample.id}.png")),
        ):
            big = upscaled(label)
            colours = np.zeros(big.shape + (3,), np.float32)
            for class_id in np.unique(big):
                colours[big == class_id] = VOC_COLOURS[int(class_id)]
            expected = image * 0.4 + colours * 0.6
            assert np.abs(thumbs[column].astype(np.float32) - expected).max() <= 1.0, column
        # CAM column: 0.5 image + 0.5 heat map; the heat is red where the CAM peaks, blue where it is 0.
        with np.load(runs["full"] / "infer_cam" / "cams" / f"{sample.id}.npz") as data:
            strongest = data["cams"].astype(np.float32).max(axis=0)
        heat = thumbs["CAM"].astype(np.float32) * 2 - image
        hot = np.unravel_index(np.argmax(strongest), strongest.shape)
        cold = np.unravel_index(np.argmin(strongest), strongest.shape)
        hy, hx = hot[0] * scale + scale // 2, hot[1] * scale + scale // 2
        cy, cx = cold[0] * scale + scale // 2, cold[1] * scale + scale // 2
        assert strongest.max() > 0.5 and strongest.min() < 0.2
        assert heat[hy, hx, 0] > heat[hy, hx, 2] + 40
        assert heat[cy, cx, 2] > heat[cy, cx, 0] + 40

    # The run stopped after `refine`: image, CAM and ground truth only; the rest say why.
    early = page.find("table", cls="overlays", data_run="early")
    assert [img.attrs["data-column"] for img in early.find_all("img")] == ["image", "CAM", "ground truth"] * MAX_IMAGES
    empty = [d.text() for d in early.find_all("div", cls="empty-cell")]
    assert empty == ["no pseudo-label", "no prediction"] * MAX_IMAGES
    # The legend's swatches carry the VOC colours.
    legend = page.find_all("p", cls="legend")[0]
    for class_id in range(dataset.num_classes):
        swatch = legend.find("span", cls="swatch", data_class_id=str(class_id))
        assert swatch.attrs["style"] == "background: rgb({}, {}, {})".format(*VOC_COLOURS[class_id])


def test_page_is_self_contained(report):
    text = report.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    page = parse(report)
    for node in page.iter():
        for key in ("src", "href", "xlink:href"):
            if key in node.attrs:
                assert node.attrs[key].startswith("data:"), (node.tag, key)
    assert page.find_all("script") == [] and page.find_all("link") == []
    assert "url(" not in page.find("style").text() and "@import" not in page.find("style").text()


def test_text_from_files_is_escaped(runs, tmp_path):
    run = tmp_path / 'odd <x-odd> & "q"'
    shutil.copytree(runs["early"], run)
    out = write_report([run], tmp_path / "r.html", max_images=1)
    text = out.read_text(encoding="utf-8")
    assert "<x-odd>" not in text and "odd &lt;x-odd&gt; &amp; &quot;q&quot;" in text
    assert parse(out).find("svg", cls="jf-scatter").find_all("text", cls="point-label")[0].text() == run.name


# --- what the page does with incomplete or wrong folders -------------------------------------


def test_not_a_run_folder_is_refused_before_writing(runs, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    out = tmp_path / "r.html"
    for bad in (plain, tmp_path / "does-not-exist"):
        with pytest.raises(DataError) as caught:
            write_report([runs["full"], bad], out)
        assert caught.value.path == str(bad)
        assert caught.value.problem.startswith("no weakseg outputs here: neither results.json nor a finished step")
    assert not out.exists() and list(tmp_path.glob(".r.html*")) == []


def test_bad_results_json_arguments_and_shared_folder_names(runs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot be read as JSON"):
        write_report([broken], tmp_path / "r.html")
    with pytest.raises(WeaksegError, match="at least one run folder"):
        write_report([], tmp_path / "r.html")
    with pytest.raises(WeaksegError, match="max-images"):
        write_report([runs["early"]], tmp_path / "r.html", max_images=-1)
    # Two runs both called "early" in different folders are told apart by their parent.
    for parent in ("a", "b"):
        shutil.copytree(runs["early"], tmp_path / parent / "early")
    out = write_report([tmp_path / "a" / "early", tmp_path / "b" / "early"], tmp_path / "r.html", max_images=0)
    points = parse(out).find("svg", cls="jf-scatter").find_all("circle", cls="point")
    assert sorted({p.attrs["data-run"] for p in points}) == ["a/early", "b/early"]


def test_run_without_config_still_shows_its_metrics(runs, tmp_path):
    run = tmp_path / "early"
    shutil.copytree(runs["early"], run)
    (run / "config.yaml").unlink()
    out = write_report([run], tmp_path / "r.html")
    page = parse(out)
    cams = results_of(run)["stages"]["cam"]
    cells = [td.text() for td in page.find("table", cls="metrics").find_all("tr")[1].find_all("td")]
    assert cells == ["cam"] + [percent(cams[k]) for k in METRIC_KEYS]
    assert page.find_all("img") == []
    assert "no config.yaml" in page.find("ul", cls="runs").text()


# --- rendered by a browser --------------------------------------------------------------------


def _find(screen: np.ndarray, tile: np.ndarray) -> tuple[int, int] | None:
    """Top-left corner where `tile` appears pixel for pixel (within 2) in `screen`, if anywhere."""
    th, tw = tile.shape[:2]
    ys, xs = np.nonzero(np.all(screen == tile[0, 0], axis=-1))
    for y, x in zip(ys, xs):
        window = screen[y:y + th, x:x + tw]
        if window.shape == tile.shape and np.abs(window.astype(int) - tile.astype(int)).max() <= 2:
            return int(y), int(x)
    return None


def test_headless_chromium_renders_charts_and_thumbnails(runs, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("headless Chromium (Debian package `chromium`) is not installed: "
                    "apt-get install chromium to run the rendering check")
    out = write_report([runs["full"]], tmp_path / "report.html", max_images=1)
    shot = tmp_path / "shot.png"
    # Chromium >= 132 is always the "new" headless mode; --screenshot captures the window.
    # A private profile keeps the run away from the user's ~/.config/chromium.
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1200,2400", out.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    screen = np.asarray(Image.open(shot).convert("RGB"))
    assert screen.shape[:2] == (2400, 1200)
    # Not blank: many colours (the thumbnails) and real contrast.
    assert len(np.unique(screen.reshape(-1, 3), axis=0)) > 2000
    assert screen.std() > 20
    # The charts: every stage colour of the scatter and the bar colour are painted.
    for colour in list(STAGE_COLOURS.values()) + ["#4c72b0"]:
        rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        assert np.all(screen == rgb, axis=-1).sum() >= 20, colour
    # The first thumbnail is on screen pixel for pixel, and right of it the other four
    # columns are pictures, not white page.
    row = parse(out).find("table", cls="overlays").find_all("img")
    first = decode_png(row[0].attrs["src"])
    corner = _find(screen, first)
    assert corner is not None, "the image thumbnail is not on the screenshot"
    y, x = corner
    for column, img in enumerate(row[1:], start=1):
        tile = decode_png(img.attrs["src"])
        found = _find(screen[y:y + tile.shape[0] + 1], tile)
        assert found is not None and found[1] > x, OVERLAY_COLUMNS[column]
    strip = screen[y:y + first.shape[0], x:x + 5 * first.shape[1]].astype(np.float32)
    assert (strip.min(axis=-1) > 245).mean() < 0.1 and strip.std() > 20


def test_learning_curve_png_draws_each_point_where_its_value_says(tmp_path):
    from PIL import Image

    from weakseg.report.curves import SERIES_COLOURS, Series, line_chart_png

    j = Series("held-back J", [1, 2, 4, 8], [10.0, 20.0, 30.0, 32.0])
    f = Series("held-back F", [1, 2, 4, 8], [5.0, 7.0, 8.0, 8.5])
    path = tmp_path / "curve.png"
    geometry = line_chart_png(path, [j, f], "title", "epoch", "%")
    assert geometry.y_ticks[0] == 0.0 and geometry.y_ticks[-1] >= 32.0 and geometry.x_ticks[-1] >= 8
    image = Image.open(path).convert("RGB")
    assert image.size == (720, 440)
    for series, colour in ((j, SERIES_COLOURS[0]), (f, SERIES_COLOURS[1])):
        expected = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        for x, y in zip(series.xs, series.ys):
            px, py = geometry.pixel(x, y)
            assert image.getpixel((round(px), round(py))) == expected
    # A hand-computed point: x ticks 0..8 (step 2), y ticks 0..40 (step 10) on a 632 x 344 box at (64, 40).
    assert geometry.x_ticks == [0, 2, 4, 6, 8] and geometry.y_ticks == [0, 10, 20, 30, 40]
    assert geometry.pixel(4, 20.0) == (64 + 632 / 2, 40 + 344 / 2)
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]  # no temporary file left


def test_learning_curve_png_refuses_series_of_unequal_length(tmp_path):
    from weakseg.report.curves import Series, line_chart_png

    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        line_chart_png(tmp_path / "c.png", [Series("J", [1, 2, 3], [1.0, 2.0])], "t", "x", "y")
    assert not list(tmp_path.iterdir())
