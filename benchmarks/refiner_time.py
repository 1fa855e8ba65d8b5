"""Per-image time of every refiner at VOC size (500x375, background + 3 present classes): the
dense CRF, PAMR, SPR and the AffinityNet random walk; a markdown table of the median (and
min/max) over a few runs.

    OMP_NUM_THREADS=1 python benchmarks/refiner_time.py [--repeats 5] [--device cpu] [--device cuda]

The random walk's time includes the AffinityNet forward pass (EfficientNet-Lite0, output
stride 16, as in configs/voc_icam.yaml; an untrained head costs the same as a trained one),
the walk (beta 8, 2^6 steps, radius 5) and the upsampling.

The input is synthetic but shaped like the real thing: a smooth random image (uint8) and
probabilities from smooth random CAMs through `cams_to_probs`, so the CRF's permutohedral
lattice sees a realistic number of distinct colours. Each refiner runs once untimed first
(imports, CUDA start-up, allocator warm-up). CUDA times are synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

from weakseg.refine.base import cams_to_probs
from weakseg.refine.crf import DenseCRF
from weakseg.refine.affinity import AffinityNet, RandomWalk
from weakseg.refine.pamr import PAMR, SPR

WIDTH, HEIGHT, PRESENT = 500, 375, 3


def synthetic_input(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.uniform(0, 255, (HEIGHT, WIDTH, 3)), sigma=(6, 6, 0))
    image = (image - image.min()) / (image.max() - image.min()) * 255
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    cams = ndimage.gaussian_filter(rng.uniform(0, 1, (PRESENT, HEIGHT, WIDTH)), sigma=(0, 25, 25))
    cams = np.clip((cams - cams.mean(axis=(1, 2), keepdims=True)) * 8 + 0.3, 0, None)
    cams = cams / cams.max(axis=(1, 2), keepdims=True)
    return cams_to_probs(cams).astype(np.float32), image


def time_refiner(refiner, probs, image, repeats: int, cuda: bool) -> list[float]:
    refiner(probs, image)  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = refiner(probs, image)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert out.shape == probs.shape and np.allclose(out.sum(0), 1.0, atol=1e-4)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="device for PAMR/SPR (repeatable; default cpu, plus cuda when available)")
    args = parser.parse_args()
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    probs, image = synthetic_input()

    rows = []
    try:
        for preset in ("psa", "label"):
            rows.append((f"crf ({preset})", "cpu", time_refiner(DenseCRF(preset), probs, image, args.repeats, False)))
    except ImportError as err:
        print(f"(dense CRF skipped: {err})")
    for device in devices:
        cuda = device == "cuda"
        rows.append(("pamr", device, time_refiner(PAMR(device=device), probs, image, args.repeats, cuda)))
        rows.append(("spr (alpha 0.8)", device, time_refiner(SPR(device=device), probs, image, args.repeats, cuda)))
        torch.manual_seed(0)
        net = AffinityNet("efficientnet_lite0", output_stride=16)
        walk = RandomWalk(net, beta=8, log_t=6, radius=5, device=device)
        rows.append(("affinity_rw (Lite0, OS16)", device, time_refiner(walk, probs, image, args.repeats, cuda)))

    print(f"Per-image refiner time, {WIDTH}x{HEIGHT}, K = 1 + {PRESENT}, median of {args.repeats} runs "
          f"(torch threads: {torch.get_num_threads()}"
          + (f", GPU: {torch.cuda.get_device_name()}" if "cuda" in devices else "") + ")\n")
    print("| refiner | device | median (ms) | min (ms) | max (ms) |")
    print("|---|---|---:|---:|---:|")
    for name, device, times in rows:
        ms = [t * 1000 for t in times]
        print(f"| {name} | {device} | {statistics.median(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} |")


if __name__ == "__main__":
    main()
