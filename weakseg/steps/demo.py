"""The demo: the whole WSSS idea on the embedded synthetic RGB-D data, on a CPU, in a minute.

generate data -> train a small CAM network from scratch (GAP + multi-label soft margin,
image-level labels only) -> CAMs (flip) -> background-threshold sweep -> pseudo-labels at
the best threshold -> evaluate against the synthetic masks -> results.json + overlays.

Outputs in the run directory:
    results.json          metrics (keys as `weakseg eval` + cam_threshold, sweep, train_loss)
    pseudo_labels/<id>.png, gt/<id>.png, classes.txt
                          so `weakseg eval --pred DIR/pseudo_labels --gt DIR/gt
                          --classes DIR/classes.txt` recomputes the same numbers
    overlays/<id>.png     image | CAM | pseudo-label | ground truth
    train_cam/            the trainer's checkpoint.pt and log.csv (every loss term per step)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from weakseg.config import to_dict
from weakseg.data import synthetic
from weakseg.data.io import write_label_png, write_rgb_png, write_text_atomic
from weakseg.data.tensor import rgb_batch
from weakseg.metrics.cam_sweep import ThresholdSweep, cam_to_label
from weakseg.metrics.evaluator import SegEvaluator, metrics_json
from weakseg.models.inference import infer_cams
from weakseg.models.methods.cam import CAMNet
from weakseg.progress import console, progress_bar
from weakseg.report.overlays import overlay_panel
from weakseg.data.base import SegDataset
from weakseg.data.transforms import AugmentConfig
from weakseg.losses.terms import LossConfig
from weakseg.train.trainer import TrainConfig, train


def demo_train_config(epochs: int, seed: int) -> TrainConfig:
    """GAP + multi-label soft margin, AdamW with poly LR, random flips only: on the one
    trainer, in the main process (the data is already in memory)."""
    return TrainConfig(epochs=epochs, batch_size=16, optimizer="adamw", lr=3e-3, weight_decay=1e-4, seed=seed,
                       augment=AugmentConfig(), workers=0)


class _InMemory(SegDataset):
    """The generated samples, kept: the trainer reads each one every epoch."""

    def __init__(self, source: SegDataset, samples: list):
        super().__init__(class_names=source.class_names, background_index=source.background_index,
                         ids=list(source.ids), name=source.name)
        self.samples = samples

    def load(self, index: int):
        return self.samples[index]


@dataclass
class DemoConfig:
    data: synthetic.Config = field(default_factory=synthetic.Config)
    train: TrainConfig = field(default_factory=lambda: demo_train_config(25, 0))
    width: int = 24
    output_stride: int = 4
    num_overlays: int = 8


def demo_config(quick: bool, seed: int = 0) -> DemoConfig:
    """`--quick` (< 60 s on 2 cores) and the default (< 3 min): same pipeline, smaller sizes."""
    if quick:
        return DemoConfig(
            data=synthetic.Config(num_images=300, image_size=64, seed=seed),
            train=demo_train_config(25, seed),
            width=16,
        )
    return DemoConfig(
        data=synthetic.Config(num_images=400, image_size=80, seed=seed),
        train=demo_train_config(35, seed),
        width=24,
    )


def run(out_dir: str | Path, quick: bool = False, seed: int = 0, show_progress: bool = True) -> dict:
    out = Path(out_dir)
    config = demo_config(quick, seed)
    started = time.perf_counter()
    torch.use_deterministic_algorithms(True)

    with progress_bar(show_progress) as bars:
        dataset = synthetic.build(config.data)
        task = bars.add_task("generate data", total=len(dataset))
        samples = []
        for i in range(len(dataset)):
            samples.append(dataset[i])
            bars.advance(task)
        images = rgb_batch([s.image for s in samples])

        torch.manual_seed(seed)
        model = CAMNet(len(dataset.foreground_ids), width=config.width, output_stride=config.output_stride)
        task = bars.add_task("train CAM network", total=1)
        history = train(
            model, _InMemory(dataset, samples), LossConfig(), config.train, out / "train_cam",
            on_step=lambda step, total: bars.update(task, completed=step, total=total),
        )["epoch_losses"]

        task = bars.add_task("CAMs + threshold sweep", total=len(samples))
        sweep = ThresholdSweep(dataset.num_classes, dataset.background_index)
        all_cams = []
        for i, sample in enumerate(samples):
            indices = np.flatnonzero(sample.labels > 0.5).tolist()
            cams = infer_cams(model, images[i : i + 1], indices, flip=True)
            class_ids = sample.present_class_ids
            sweep.add(cams, class_ids, sample.mask)
            all_cams.append((cams, class_ids))
            bars.advance(task)
        threshold, _ = sweep.best()

        task = bars.add_task("pseudo-labels + evaluation", total=len(samples))
        evaluator = SegEvaluator.for_dataset(dataset)
        for i, (sample, (cams, class_ids)) in enumerate(zip(samples, all_cams)):
            pseudo = cam_to_label(cams, class_ids, threshold, dataset.background_index)
            evaluator.add(pseudo, sample.mask)
            write_label_png(out / "pseudo_labels" / f"{sample.id}.png", pseudo)
            write_label_png(out / "gt" / f"{sample.id}.png", sample.mask)
            if i < config.num_overlays:
                panel = overlay_panel(sample.image, cams, pseudo, sample.mask, scale=3)
                write_rgb_png(out / "overlays" / f"{sample.id}.png", panel)
            bars.advance(task)

    write_text_atomic(out / "classes.txt", "\n".join(dataset.class_names) + "\n")
    results = evaluator.summary()
    results["cam_threshold"] = threshold
    results["threshold_sweep"] = {f"{t:.2f}": float(j) for t, j in zip(sweep.thresholds, sweep.mious())}
    results["train_loss"] = history
    results["config"] = to_dict(config)
    results["quick"] = quick
    write_text_atomic(out / "results.json", metrics_json(results))
    console.print(
        f"demo: J={results['miou']:.4f}  F={results['contour_f']:.4f}  J&F={results['jf']:.4f}  "
        f"boundary IoU={results['boundary_iou']:.4f}  threshold={threshold:.2f}  "
        f"({time.perf_counter() - started:.1f} s) -> {out / 'results.json'}"
    )
    return results
