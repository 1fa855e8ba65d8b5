"""Wall time of whole pipelines on this machine, step by step (shape-cues Table 7's
comparison: a single-stage run against the multi-stage pipelines).

    python benchmarks/pipeline_time.py configs/voc_shape_cues.yaml configs/voc_hfpl.yaml
        [--threads 2] [--out runs/pipeline_time] [--set key=value ...]

Each config is run by `weakseg run` into OUT/<config stem> (a finished run is only read again:
delete the folder to time it anew), one after the other, never side by side, so the runs
share nothing but the machine. `--set` overrides go to every config (e.g. the same `dataset`
for all). The table has each step's seconds from the run's results.json and the total; time a
machine that runs nothing else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from weakseg.steps import pipeline
from weakseg.steps.pipeline import STEP_NAMES

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", type=Path, nargs="+")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "pipeline_time")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="overrides for every config")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    timings = {}
    for config in args.configs:
        folder = args.out / config.stem
        pipeline.run(config, [f"out={folder}", *args.overrides])
        timings[config.name] = json.loads((folder / "results.json").read_text())["seconds"]
    steps = [s for s in STEP_NAMES if any(s in t for t in timings.values())]
    print("\n| config | " + " | ".join(steps) + " | total (min) |")
    print("|---|" + "---|" * (len(steps) + 1))
    for name, seconds in timings.items():
        cells = [f"{seconds[s] / 60:.1f}" if s in seconds else "" for s in steps]
        print(f"| {name} | " + " | ".join(cells) + f" | {sum(seconds.values()) / 60:.1f} |")
    print("\n(minutes per step)")


if __name__ == "__main__":
    main()
