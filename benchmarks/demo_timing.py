"""Wall time and reproducibility of `weakseg demo` (targets: --quick < 60 s, default < 3 min on
2 CPU cores; the same seed gives a byte-identical results.json).

    python benchmarks/demo_timing.py [--repeats 2] [--skip-default]

Each run is a fresh `weakseg demo` process (interpreter start and imports included), so the
times are what a user waits for. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"--quick": 60.0, "default": 180.0}


def run_demo(mode: str, out: Path) -> tuple[float, str, dict]:
    cmd = [sys.executable, "-m", "weakseg.cli", "demo", "--out", str(out)]
    if mode == "--quick":
        cmd.append("--quick")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    text = (out / "results.json").read_bytes()
    return seconds, hashlib.sha256(text).hexdigest()[:12], json.loads(text)


def all_background_j(quick: bool) -> float:
    """J of the trivial prediction "everything is background" on the demo's data: the floor a
    trained CAM has to beat."""
    import numpy as np

    from weakseg.data import synthetic
    from weakseg.metrics.evaluator import SegEvaluator
    from weakseg.steps.demo import demo_config

    data = demo_config(quick).data
    dataset = synthetic.build(data)
    evaluator = SegEvaluator(dataset.class_names)
    for i in range(data.num_images):
        _, mask, _ = synthetic.generate(data, i)
        evaluator.add(np.zeros_like(mask), mask)
    return evaluator.summary()["miou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-default", action="store_true")
    args = parser.parse_args()
    modes = ["--quick"] + ([] if args.skip_default else ["default"])
    print(f"CPU cores: {os.cpu_count()}, torch threads default\n")
    print("| mode | run | wall time (s) | target (s) | results.json sha256 | J | F | J&F | threshold |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            digests = set()
            for r in range(args.repeats):
                seconds, digest, res = run_demo(mode, Path(tmp) / f"{mode.strip('-')}{r}")
                digests.add(digest)
                print(
                    f"| {mode} | {r + 1} | {seconds:.1f} | {TARGETS[mode]:.0f} | {digest} | {res['miou']:.4f} | "
                    f"{res['contour_f']:.4f} | {res['jf']:.4f} | {res['cam_threshold']:.2f} |",
                    flush=True,
                )
            print(f"| {mode} | identical over runs: {'yes' if len(digests) == 1 else 'NO'} | | | | | | | |")
    print()
    for mode in modes:
        print(f"all-background baseline J ({mode} data): {all_background_j(mode == '--quick'):.4f}")


if __name__ == "__main__":
    main()
