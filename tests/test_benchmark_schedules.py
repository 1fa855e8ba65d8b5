"""The CAM benchmark's per-row schedule: every row trains SCHEDULE's epochs unless its config
carries its own held-back curve's (benchmarks/cam_real_data.py, OWN_SCHEDULE)."""

import importlib.util
from pathlib import Path

from weakseg.steps import pipeline

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("cam_real_data", ROOT / "benchmarks" / "cam_real_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _epochs(config_file: str, overrides: list[str]) -> int:
    config, _ = pipeline.load_config(ROOT / "configs" / config_file, overrides)
    return config.train_cam.train.epochs


def test_rows_train_the_shared_schedule_unless_their_config_has_its_own():
    bench = _benchmark()
    seen_own = set()
    for dataset, recipes in bench.RECIPES.items():
        shared = int(bench.SCHEDULE[dataset][0].split("=")[1])
        for name, (config_file, overrides) in recipes.items():
            epochs = _epochs(config_file, bench.schedule_overrides(dataset, config_file) + overrides)
            if config_file in bench.OWN_SCHEDULE:
                seen_own.add(config_file)
                # The config's own number, and a different one: otherwise the exemption is moot.
                assert epochs == _epochs(config_file, []) != shared, (dataset, name)
            else:
                assert epochs == shared, (dataset, name)
    assert seen_own == bench.OWN_SCHEDULE  # no stale entry naming a config no row uses
