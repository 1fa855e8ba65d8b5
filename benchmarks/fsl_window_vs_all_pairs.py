"""Windowed FSL against the all-pairs formulation: time (forward + backward) and peak memory.

    python benchmarks/fsl_window_vs_all_pairs.py [--size 56] [--classes 21] [--batch 4] [--repeats 3]

Targets (issues 3 and 17): windowed >= 20x faster and >= 20x less memory at 56x56, 21 classes,
batch 4, with the default window leaving out < 1e-4 of the loss. Each variant runs in its own process; memory is that process's peak resident set
size (ru_maxrss) minus its size just before the loss is computed, i.e. what the loss adds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from weakseg.losses.fsl import default_radius, feature_similarity_loss, feature_similarity_loss_all_pairs, window_truncation_bound
variant, size, classes, batch, repeats = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
p = torch.rand(batch, classes, size, size, requires_grad=True)
image = torch.rand(batch, 3, size, size)
mask = (torch.rand(batch, classes) < 0.3).float()
fn = feature_similarity_loss if variant == "windowed" else feature_similarity_loss_all_pairs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeats):
    start = time.perf_counter()
    loss = fn(p, image, mask)
    loss.backward()
    times.append(time.perf_counter() - start)
    p.grad = None
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"time": min(times), "mem_mib": (peak - before) / 1024, "loss": loss.item(),
                  "bound": window_truncation_bound(5.0, default_radius(5.0), classes), "radius": default_radius(5.0)}))
"""


def measure(variant: str, args) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(args.size), str(args.classes), str(args.batch), str(args.repeats)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    win = measure("windowed", args)
    full = measure("all_pairs", args)
    print(f"FSL at {args.size}x{args.size}, {args.classes} classes, batch {args.batch}, sigma 5, mu 2.5, L1; "
          f"window radius {win['radius']} (the default); best of {args.repeats}, forward + backward, float32 CPU\n")
    print("| variant | time (s) | peak extra memory (MiB) | loss |")
    print("|---|---|---|---|")
    for name, r in ((f"windowed (radius {win['radius']})", win), ("all pairs", full)):
        print(f"| {name} | {r['time']:.3f} | {max(r['mem_mib'], 0.1):.1f} | {r['loss']:.6f} |")
    print(f"| ratio all-pairs / windowed | {full['time'] / win['time']:.1f}x | "
          f"{full['mem_mib'] / max(win['mem_mib'], 0.1):.1f}x | |")
    difference = abs(full['loss'] - win['loss'])
    print(f"\n|loss difference| = {difference:.2e} ({difference / abs(full['loss']):.1e} of the loss); truncation bound "
          f"({args.classes} classes, worst case) = {win['bound']:.2e}")


if __name__ == "__main__":
    main()
