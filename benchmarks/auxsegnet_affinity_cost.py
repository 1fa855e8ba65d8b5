"""The dual affinity's extra cost over a plain non-local block (auxsegnet-plus §III-B, "Time
complexity": +0.8 % at C = 128).

One task's affinity module on a C x h x w feature map, forward + backward, median wall time:
- non-local: query/key/value 1x1 convs, A = softmax(QK^T) (eq. 2), x + W(A V) (eq. 3);
- dual: the same plus the unary affinity (1-channel conv, spatial softmax, eq. 8-9) and its
  context in the sum (eq. 12).
Also the multiply-adds of each, counted from the shapes.

    python benchmarks/auxsegnet_affinity_cost.py [--grid 41] [--channels 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from weakseg.models.methods.auxsegnet import TaskBranch


def median_time(step, repeats: int) -> float:
    """Median wall time of `step()` over `repeats` calls, after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=41, help="h = w of the feature map (321 px at stride 8: 41)")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c, n = args.channels, args.grid * args.grid
    x = torch.randn(args.batch, c, args.grid, args.grid, requires_grad=True)
    plain = TaskBranch(c, 1, c, affinity=True, unary=False, post_conv=False)
    dual = TaskBranch(c, 1, c, affinity=True, unary=True, post_conv=False)
    dual.load_state_dict(plain.state_dict(), strict=False)

    def step(branch: TaskBranch):
        def run():
            pairwise, unary = branch.affinities(x)
            branch.enhanced(x, pairwise, unary).sum().backward()
        return run

    t_plain = median_time(step(plain), args.repeats)
    t_dual = median_time(step(dual), args.repeats)
    # multiply-adds of one image: 4 1x1 convs (C x C x N), QK^T and A V (N x N x C each)
    macs_plain = 4 * c * c * n + 2 * n * n * c
    macs_dual = macs_plain + c * n + n * c  # unary conv (C -> 1) and its context (N x C)
    print(f"feature map {c} x {args.grid} x {args.grid} (N = {n}), batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.repeats} forward + backward passes\n")
    print("| module | ms | multiply-adds per image (M) |")
    print("|---|---|---|")
    print(f"| non-local block (pairwise) | {t_plain * 1e3:.1f} | {macs_plain / 1e6:.1f} |")
    print(f"| dual affinity (pairwise + unary) | {t_dual * 1e3:.1f} | {macs_dual / 1e6:.1f} |")
    print(f"| extra | {100 * (t_dual / t_plain - 1):+.1f} % | {100 * (macs_dual / macs_plain - 1):+.2f} % |")


if __name__ == "__main__":
    main()
