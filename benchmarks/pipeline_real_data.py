"""The whole `weakseg run` on real data: wall time of every step and J, F, J&F, boundary IoU
of every stage (cam, refined, pseudo_labels, final), as a markdown table.

    python benchmarks/pipeline_real_data.py [--config configs/voc_icam.yaml] [--out runs/bench_pipeline] [key=value ...]

Target (issue 4): the VOC run with EfficientNet-Lite0 and its short schedule finishes in
<= 30 min on 2 CPU cores. Steps that already finished with the same config are reused (as
`weakseg run` does); pass `--fresh` to start over and time every step.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from weakseg.steps import pipeline

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "voc_icam.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_pipeline"))
    parser.add_argument("--fresh", action="store_true", help="delete OUT first so every step runs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    started = time.perf_counter()
    summary = pipeline.run(args.config, args.overrides + [f"out={args.out}"])
    wall = time.perf_counter() - started

    print(f"\n{args.config.name} {' '.join(args.overrides)}: evaluated on {summary['evaluated_on']}, "
          f"total {wall / 60:.1f} min (this invocation)\n")
    print("| stage | J (%) | F (%) | J&F (%) | boundary IoU (%) |")
    print("|---|---|---|---|---|")
    for stage, values in summary["stages"].items():
        cells = [f"{100 * values[k]:.1f}" if values.get(k) is not None else "n/a"
                 for k in ("miou", "contour_f", "jf", "boundary_iou")]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    labels = summary["pseudo_labels"]
    print(f"\npseudo-labels: coverage {labels['coverage']:.3f}, J on labelled pixels {labels['labelled_miou']:.3f}")
    print("\n| step | seconds |\n|---|---|")
    for step, seconds in summary["seconds"].items():
        print(f"| {step} | {seconds:.0f} |")
    print(f"| total (sum of steps) | {sum(summary['seconds'].values()):.0f} |")


if __name__ == "__main__":
    main()
