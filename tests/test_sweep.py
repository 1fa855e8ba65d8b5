"""`weakseg sweep`: grid parsing, the mean/std maths and the table cells by hand; a pipeline
sweep (2 seeds x 2 values) whose table equals the per-job results.json on disk and whose
rerun trains nothing; a CAM-config sweep that reuses its jobs and re-trains a changed one."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest
import torch
import yaml

from weakseg.config import parse_override
from weakseg.errors import ConfigError
from weakseg.steps import sweep

# ---------------------------------------------------------------- pure functions


def test_parse_grid_values_are_yaml_and_split_at_top_level_commas():
    grid = sweep.parse_grid([
        "cam.infer.scales=[0.5,1.0],[1.0]",
        "refine.method=crf,pamr",
        "x=1,2.5,true,null,abc",
        "cam.loss.fsl={upsample: 4, weight: 0.5},null",
        "name='a,b',c",
    ])
    assert list(grid) == ["cam.infer.scales", "refine.method", "x", "cam.loss.fsl", "name"]  # order kept
    assert grid["cam.infer.scales"] == [[0.5, 1.0], [1.0]]
    assert grid["refine.method"] == ["crf", "pamr"]
    assert grid["x"] == [1, 2.5, True, None, "abc"]
    assert [type(v) for v in grid["x"][:3]] == [int, float, bool]
    assert grid["cam.loss.fsl"] == [{"upsample": 4, "weight": 0.5}, None]
    assert grid["name"] == ["a,b", "c"]  # a quoted comma does not split
    # one value reads as a single `key=value` override reads it
    assert sweep.parse_grid(["a.b=0.001"])["a.b"] == [parse_override("a.b=0.001")[1]]
    assert sweep.parse_grid([]) == {}


@pytest.mark.parametrize("items, words", [
    (["refine.method"], "expected key=value"),
    (["a=1,,2"], "empty value"),
    (["a="], "empty value"),
    (["a=1,"], "empty value"),
    (["=1,2"], "empty key"),
    (["a.=1"], "empty key"),
    (["a=[1,2"], "unclosed bracket"),
    (["a=1]"], "unmatched"),
    (["a='x,y"], "unclosed quote"),
    (["a=1,2", "a=3"], "given twice"),
])
def test_parse_grid_errors_name_the_item(items, words):
    with pytest.raises(ConfigError, match=words) as error:
        sweep.parse_grid(items)
    assert repr(items[-1]) in str(error.value)


def test_combinations_first_key_slowest():
    combos = sweep.combinations({"a": [1, 2], "b": ["x", "y", "z"]})
    assert combos == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
                      {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]
    assert [list(c) for c in combos] == [["a", "b"]] * 6
    assert sweep.combinations({}) == [{}]


@pytest.mark.parametrize("value", ["pamr", 1e-05, 0.5, 3, True, None, "true", "1", [0.5, 1.0], {"upsample": 4}, "a: b"])
def test_value_text_reads_back_as_the_same_value(value):
    text = sweep.value_text(value)
    assert "\n" not in text
    parsed = parse_override(f"k={text}")[1]
    assert parsed == value and type(parsed) is type(value)


def test_slugs_are_safe_and_distinct():
    assert sweep.combination_slug({}) == "base"
    assert sweep.combination_slug({"refine.method": "pamr", "cam.train.lr": 0.01}) == "refine.method=pamr__cam.train.lr=0.01"
    assert sweep.combination_slug({"cam.infer.scales": [0.5, 1.0]}) == "cam.infer.scales=[0.5,1.0]"
    values = ["1", 1, "a/b", "a_b", "a b", {"k": 1}, "x" * 300, "x" * 301]
    slugs = [sweep.combination_slug({"key": v}) for v in values]
    assert len(set(slugs)) == len(values)  # the string "1" and the int 1 differ; so do cut-off strings
    for slug in slugs:
        assert "/" not in slug and " " not in slug and len(slug) < 120


def test_mean_std_is_the_sample_statistics():
    values = [0.41, 0.433, 0.397, 0.452]
    result = sweep.mean_std(values)
    assert result["n"] == 4
    assert result["mean"] == pytest.approx(statistics.mean(values), abs=1e-15)
    assert result["std"] == pytest.approx(statistics.stdev(values), abs=1e-15)
    # by hand: mean 0.5 of (0.4, 0.6); deviations +-0.1, sum of squares 0.02 / (2 - 1)
    assert sweep.mean_std([0.4, 0.6])["std"] == pytest.approx(0.02 ** 0.5)
    assert sweep.mean_std([0.3]) == {"mean": 0.3, "std": None, "n": 1}
    assert sweep.mean_std([None, 0.2, 0.4])["n"] == 2  # a missing value is left out, not counted as 0
    assert sweep.mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_aggregate_jobs_per_stage_and_metric():
    jobs = [
        {"seed": 0, "stages": {"final": {"miou": 0.5, "jf": 0.4}, "cam": {"miou": 0.2, "jf": 0.1}}},
        {"seed": 1, "stages": {"final": {"miou": 0.7, "jf": 0.6}, "cam": {"miou": 0.3, "jf": 0.3}}},
        {"seed": 2, "stages": {"final": {"miou": 0.9}, "cam": {"miou": 0.1, "jf": 0.2}}},
    ]
    result = sweep.aggregate_jobs(jobs)
    assert list(result) == ["cam", "final"]  # pipeline order, not the jobs' key order
    assert list(result["cam"]) == ["miou", "jf"]  # metrics no job has are left out
    cam_miou = result["cam"]["miou"]
    assert cam_miou["per_seed"] == {"0": 0.2, "1": 0.3, "2": 0.1}
    assert cam_miou["mean"] == pytest.approx(statistics.mean([0.2, 0.3, 0.1]))
    assert cam_miou["std"] == pytest.approx(statistics.stdev([0.2, 0.3, 0.1]))
    final_jf = result["final"]["jf"]
    assert final_jf["n"] == 2 and final_jf["per_seed"]["2"] is None
    assert final_jf["mean"] == pytest.approx(0.5) and final_jf["std"] == pytest.approx(statistics.stdev([0.4, 0.6]))


def test_format_cell_percent_one_decimal():
    assert sweep.format_cell(0.41234, 0.02071) == "41.2 ± 2.1"
    assert sweep.format_cell(0.5, 0.0) == "50.0 ± 0.0"
    assert sweep.format_cell(0.12351, None) == "12.4"  # one seed: no spread to show
    assert sweep.format_cell(None, None) == "n/a"


def test_markdown_table_and_csv_by_hand():
    rows = [
        {"combination": {"refine.method": "pamr", "s": [0.5, 1.0]},
         "stages": {"cam": {"miou": {"mean": 0.25, "std": 0.0125, "n": 2}, "contour_f": {"mean": 0.1, "std": None, "n": 1}}}},
        {"combination": {"refine.method": "a|b", "s": [1.0]},
         "stages": {"final": {"miou": {"mean": 0.5, "std": 0.05, "n": 3}, "jf": {"mean": 0.333, "std": 0.01, "n": 3}}}},
    ]
    table = sweep.markdown_table(["refine.method", "s"], rows)
    assert table.splitlines() == [
        "| refine.method | s | stage | J | F | J&F | boundary IoU |",
        "|---|---|---|---|---|---|---|",
        "| pamr | [0.5, 1.0] | cam | 25.0 ± 1.2 | 10.0 | n/a | n/a |",
        "| a\\|b | [1.0] | final | 50.0 ± 5.0 | n/a | 33.3 ± 1.0 | n/a |",
    ]
    assert sweep.markdown_table([], rows[:1]).splitlines()[0] == "| stage | J | F | J&F | boundary IoU |"
    parsed = list(csv.DictReader(io.StringIO(sweep.csv_text(["refine.method", "s"], rows))))
    assert [r["stage"] for r in parsed] == ["cam", "final"]
    assert parsed[0]["s"] == "[0.5, 1.0]" and parsed[0]["n"] == "2"
    assert float(parsed[0]["miou_mean"]) == 0.25 and float(parsed[0]["miou_std"]) == 0.0125
    assert parsed[0]["contour_f_std"] == "" and parsed[0]["jf_mean"] == ""
    assert parsed[1]["refine.method"] == "a|b" and parsed[1]["n"] == "3"


def test_split_cli_args():
    assert sweep.split_cli_args(["--seeds", "0", "1", "2", "a=1,2", "b=x"]) == ([0, 1, 2], ["a=1,2", "b=x"])
    assert sweep.split_cli_args(["a=1,2", "--seeds", "3"]) == ([3], ["a=1,2"])
    for tokens, words in ((["a=1"], "at least one seed"), (["--seeds", "0", "seven"], "seven"),
                          (["--seeds", "0", "--seed", "1"], "--seed: unknown option"),
                          (["--seeds", "0", "a=1", "5"], "'5'"), (["--seeds", "0", "--seeds", "1"], "twice")):
        with pytest.raises(ConfigError, match=words):
            sweep.split_cli_args(tokens)


def test_seed_keys_cover_every_trainer_the_config_runs(tmp_path):
    from weakseg.steps import pipeline

    with_affinity = dict(PIPELINE, train_affinity={}, refine={"method": "affinity_rw"})
    config, _ = pipeline.load_config(_write(tmp_path, "a.yaml", with_affinity))
    assert pipeline.sweep_seed_keys(config) == ["train_cam.train.seed", "train_affinity.train.seed",
                                                "train_seg.train.seed"]
    # a step the config does not run gets no seed (setting one would add the step)
    config, _ = pipeline.load_config(_write(tmp_path, "c.yaml", CAM_CONFIG))
    assert pipeline.sweep_seed_keys(config) == ["train_cam.train.seed"]


# ---------------------------------------------------------------- end to end

TRAIN = {"epochs": 2, "batch_size": 8, "optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0001,
         "augment": {"crop_size": None, "scale_range": [1.0, 1.0], "hflip_prob": 0.5}}
DATASET = {"kind": "synthetic", "num_images": 16, "image_size": 32}
TINY = {"backbone": "tiny_cnn", "backbone_args": {"width": 8, "output_stride": 4}}
CAM_CONFIG = {"dataset": DATASET, "train_cam": {"model": TINY, "loss": {"classification": {"kind": "gap"}}, "train": TRAIN},
              "infer_cam": {"scales": [1.0], "flip": False}}
PIPELINE = dict(
    CAM_CONFIG,
    refine={"method": "pamr", "pamr_iterations": 2},
    pseudo_labels={"confidence": 0.3},
    train_seg={"model": dict(TINY, aspp_channels=8), "train": dict(TRAIN, epochs=1)},
    predict={"scales": [1.0], "flip": False},
    evaluate={},
)
PIPELINE_STEPS = 7


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(dict(data, out=str(tmp_path / name.split(".")[0]))))
    return path


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_pipeline_sweep_end_to_end(tmp_path, one_thread):
    config = _write(tmp_path, "pipe.yaml", PIPELINE)
    lines: list[str] = []
    result = sweep.run(config, [0, 1], ["infer_cam.scales=[1.0],[0.5,1.0]"], None, log=lines.append)
    out = tmp_path / "pipe_sweep"  # the config's out + _sweep
    jobs = sorted(p.relative_to(out).as_posix() for p in out.glob("*/seed*"))
    assert jobs == ["infer_cam.scales=[0.5,1.0]/seed0", "infer_cam.scales=[0.5,1.0]/seed1",
                    "infer_cam.scales=[1.0]/seed0", "infer_cam.scales=[1.0]/seed1"]
    assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(result))
    assert result["grid"] == {"infer_cam.scales": [[1.0], [0.5, 1.0]]}

    table = (out / "sweep.md").read_text()
    csv_rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text())))
    assert len(csv_rows) == 2 * 4  # combinations x stages
    for scales, slug in (([1.0], "infer_cam.scales=[1.0]"), ([0.5, 1.0], "infer_cam.scales=[0.5,1.0]")):
        # The grid value and the seed reached each job's saved config.
        for seed in (0, 1):
            saved = yaml.safe_load((out / slug / f"seed{seed}" / "config.yaml").read_text())
            assert saved["infer_cam"]["scales"] == scales
            assert saved["train_cam"]["train"]["seed"] == saved["train_seg"]["train"]["seed"] == seed
            assert "train_affinity" not in saved  # not run, so not added by the seed
        # Different seeds, different networks.
        first, second = (_weights(out / slug / f"seed{s}" / "train_cam" / "cam_model.pt") for s in (0, 1))
        assert any(not torch.equal(first[k], second[k]) for k in first)
        # The aggregate is the mean / std of the per-job results.json, read here independently.
        results = [json.loads((out / slug / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]
        entry = next(e for e in result["combinations"] if e["combination"] == {"infer_cam.scales": scales})
        assert list(entry["stages"]) == ["cam", "refined", "pseudo_labels", "final"]
        for stage in entry["stages"]:
            values = {m: [r["stages"][stage][m] for r in results] for m in sweep.METRICS}
            for metric, per_job in values.items():
                got = entry["stages"][stage][metric]
                assert got["mean"] == pytest.approx(statistics.mean(per_job), abs=1e-12)
                assert got["std"] == pytest.approx(statistics.stdev(per_job), abs=1e-12)
                row = next(r for r in csv_rows if r["infer_cam.scales"] == sweep.value_text(scales) and r["stage"] == stage)
                assert float(row[f"{metric}_mean"]) == pytest.approx(statistics.mean(per_job), abs=1e-12)
            cells = [f"{100 * statistics.mean(values[m]):.1f} ± {100 * statistics.stdev(values[m]):.1f}"
                     for m in sweep.METRICS]
            assert f"| {sweep.value_text(scales)} | {stage} | " + " | ".join(cells) + " |" in table
    # the seeds trained different CAM networks, and it shows in the CAM metrics of some combination
    assert any(len(set(e["stages"]["cam"]["miou"]["per_seed"].values())) == 2 for e in result["combinations"])

    # The same sweep again: every job is reused, no step runs, the numbers are the same.
    model = out / "infer_cam.scales=[1.0]" / "seed0" / "train_cam" / "cam_model.pt"
    stamp = model.stat().st_mtime_ns
    lines.clear()
    again = sweep.run(config, [0, 1], ["infer_cam.scales=[1.0],[0.5,1.0]"], None, log=lines.append)
    assert not [line for line in lines if "running" in line]
    assert sum("skipped" in line for line in lines) == 4 * PIPELINE_STEPS  # jobs x pipeline steps
    assert model.stat().st_mtime_ns == stamp
    assert again == result


def test_sweep_refuses_bad_requests_before_training(tmp_path):
    config = _write(tmp_path, "pipe.yaml", PIPELINE)
    for seeds, items, words in (
        ([0], ["train_cam.train.epoks=1,2"], "epoks"),  # a misspelt key, found when the combination loads
        ([0], ["train_cam.train.seed=1,2"], "--seeds"),
        ([0], ["out=a,b"], "--out"),
        ([0, 0], [], "repeated"),
        ([], [], "at least one seed"),
    ):
        with pytest.raises(ConfigError, match=words):
            sweep.run(config, seeds, items, tmp_path / "refused", log=lambda line: None)
    assert not (tmp_path / "refused").exists()
    data_only = tmp_path / "data.yaml"
    data_only.write_text(yaml.safe_dump(DATASET))
    with pytest.raises(ConfigError, match="unknown key"):
        sweep.run(data_only, [0], [], tmp_path / "refused", log=lambda line: None)


def test_cam_config_sweep_reuses_and_retrains_a_changed_job(tmp_path, one_thread):
    config = _write(tmp_path, "cam.yaml", CAM_CONFIG)
    out = tmp_path / "sweep"
    lines: list[str] = []
    result = sweep.run(config, [0, 1], [], out, log=lines.append)
    assert sum("train_cam: running" in line for line in lines) == 2
    (entry,) = result["combinations"]
    assert entry["slug"] == "base" and list(entry["stages"]) == ["cam"]
    per_job = []
    for seed in (0, 1):
        job = out / "base" / f"seed{seed}"
        assert yaml.safe_load((job / "config.yaml").read_text())["train_cam"]["train"]["seed"] == seed
        per_job.append(json.loads((job / "infer_cam" / "cam_metrics.json").read_text()))
    first, second = (_weights(out / "base" / f"seed{s}" / "train_cam" / "cam_model.pt") for s in (0, 1))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    for metric in sweep.METRICS:
        values = [m[metric] for m in per_job]
        assert entry["stages"]["cam"][metric]["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert entry["stages"]["cam"][metric]["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert "| cam | " in (out / "sweep.md").read_text()

    # Again: every step of both jobs skipped (their done.json), nothing trained, files untouched.
    model = out / "base" / "seed0" / "train_cam" / "cam_model.pt"
    stamp = model.stat().st_mtime_ns
    lines.clear()
    assert sweep.run(config, [0, 1], [], out, log=lines.append) == result
    assert sum("skipped" in line for line in lines) == 2 * 2 and not [line for line in lines if "running" in line]
    assert model.stat().st_mtime_ns == stamp

    # The config file changed (one epoch): its recorded config no longer matches, so both
    # jobs train again from scratch (the old checkpoint is not resumed), and a third seed runs.
    one_epoch = dict(CAM_CONFIG["train_cam"], train=dict(TRAIN, epochs=1))
    config.write_text(yaml.safe_dump(dict(CAM_CONFIG, train_cam=one_epoch, out=str(tmp_path / "cam"))))
    lines.clear()
    changed = sweep.run(config, [0, 1, 2], [], out, log=lines.append)
    assert sum("train_cam: running" in line for line in lines) == 3
    log_rows = (out / "base" / "seed0" / "train_cam" / "log.csv").read_text().splitlines()
    assert len(log_rows) == 1 + 2  # header + 16 images / batch 8 for one epoch
    assert changed["combinations"][0]["stages"]["cam"]["miou"]["n"] == 3

    # A folder weakseg did not make is never deleted.
    foreign = tmp_path / "other" / "base" / "seed0" / "train_cam"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a step folder"):
        sweep.run(config, [0], [], tmp_path / "other", log=lambda line: None)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_sweep_prints_the_table_and_records_the_sweep(tmp_path, one_thread):
    from typer.testing import CliRunner

    from weakseg.cli import app
    from weakseg.record import read_record

    config = _write(tmp_path, "cam.yaml", CAM_CONFIG)
    out = tmp_path / "sweep"
    key = "train_cam.train.lr"
    result = CliRunner().invoke(app, ["sweep", str(config), "--seeds", "0", "1", f"{key}=0.01,0.003", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "sweep.json").read_text())
    assert [c["combination"] for c in saved["combinations"]] == [{key: 0.01}, {key: 0.003}]
    for row in sweep.markdown_table([key], saved["combinations"]).splitlines()[2:]:
        assert row in result.output
    record = read_record(out)
    assert record["step"] == "sweep" and record["status"] == "completed" and record["config"]["seeds"] == [0, 1]
    assert "0.003/seed1/train_cam/cam_model.pt" in " ".join(record["outputs"]).replace(f"{key}=", "")
    bad = CliRunner().invoke(app, ["sweep", str(config), f"{key}=0.1"])
    assert bad.exit_code != 0 and "--seeds" in str(bad.exception or bad.output)
