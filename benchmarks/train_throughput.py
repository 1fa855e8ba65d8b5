"""Training, inference and evaluation speed, against the code of another commit, in one run.

    python benchmarks/train_throughput.py                      # against 4942548 (before the engine issue)
    python benchmarks/train_throughput.py --baseline HEAD~3 --steps 16 --only cam eval

Every row is measured in a fresh subprocess on the 330 shared VOC images (synthetic images
where ../shared/data is absent), with the machine's cores as torch threads. The baseline
rows import weakseg from `git archive BASELINE` unpacked into a temporary folder; an option
the baseline does not have is marked n/a. Rows:

- train: CAM (EfficientNet-Lite0, 256 px crops, batch 8), SEAM (Lite0), ViT CAM (DeiT-S,
  224 px) and DeepLab (Lite0 + ASPP) images/s over the steps after the first two, for the
  baseline, then the current code with each option added in turn (workers, channels_last,
  bf16, freeze_stages 2; the ViT freezes 1, its patch embedding); `data wait` is the share
  of the steady steps' time spent waiting for the batch;
  the bf16 row also gives the change in CAM J of a short fixed-seed run (`--j-epochs`).
- data: the data pipeline alone (decode + augment + batch), images/s with 0, 1 and 2 workers.
- infer: CAM inference (the infer-cam step, scale 1 + flip) and segmentation inference (the
  predict step) images/s on `--infer-images` images; also one torch thread for CAMs.
- eval: `weakseg eval`'s step on the 330 VOC masks (J + F + boundary IoU) against shifted
  masks with a wrong-class square, images/s.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOC = REPO.parent / "shared" / "data" / "VOCdevkit" / "VOC2012"


def dataset_config() -> dict:
    if (VOC / "JPEGImages").is_dir():
        return {"kind": "voc", "root": str(VOC), "split": "train"}
    return {"kind": "synthetic", "num_images": 330, "image_size": 320}


# --------------------------------------------------------------------------- child side


def _known(cls, values: dict) -> tuple[dict, list[str]]:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}, [k for k in values if k not in names]


def child_train(job: dict) -> dict:
    import torch

    from weakseg.config import from_mapping
    from weakseg.data import build_dataset
    from weakseg.losses.terms import LossConfig
    from weakseg.models.factory import ModelConfig, SegModelConfig, build_model, build_seg_model
    from weakseg.train.trainer import TrainConfig, train

    dataset = build_dataset(job["dataset"])
    train_values = {"epochs": 1, "batch_size": job["batch"], "max_steps_per_epoch": job["steps"], "optimizer": "sgd",
                    "lr": 1e-3, "seed": 0, "augment": {"crop_size": job["crop"], "scale_range": [0.9, 1.1]},
                    **job.get("train", {})}
    train_values, missing = _known(TrainConfig, train_values)
    model_values, missing_model = _known(ModelConfig if job["kind"] != "deeplab" else SegModelConfig, job["model"])
    if missing or missing_model:
        return {"na": missing + missing_model}
    config = from_mapping(TrainConfig, train_values, "train")
    torch.manual_seed(0)
    times: list[float] = []
    on_step = lambda i, n: times.append(time.perf_counter())  # noqa: E731
    out = Path(tempfile.mkdtemp())
    if job["kind"] == "deeplab":
        import numpy as np

        from weakseg.losses.segmentation import SegmentationTerm

        model = build_seg_model(from_mapping(SegModelConfig, model_values, "model"), dataset.num_classes)
        sizes = {}

        def background_only(sample_id: str):  # speed only: a constant target, no masks read
            if sample_id not in sizes:
                sizes[sample_id] = dataset[dataset.ids.index(sample_id)].image.shape[:2]
            return np.zeros(sizes[sample_id], np.uint8)

        history = train(model, dataset, [SegmentationTerm()], config, out, on_step=on_step, masks=background_only)
    else:
        model_config = from_mapping(ModelConfig, model_values, "model")
        model = build_model(model_config, len(dataset.foreground_ids))
        loss = from_mapping(LossConfig, job.get("loss", {}), "loss")
        history = train(model, dataset, loss, config, out, background_channel=model.background_channel, on_step=on_step)
    warm = 2
    images = job["batch"] * (len(times) - 1 - warm)
    result = {"images_per_s": images / (times[-1] - times[warm]), "data_wait": history.get("data_wait")}
    if job.get("j_epochs"):
        result["cam_j"] = short_run_j(job)
    return result


def short_run_j(job: dict) -> float:
    """CAM J of a short fixed-seed run on the training images (scale 1 + flip)."""
    import torch
    import yaml

    work = Path(tempfile.mkdtemp())
    train = {"epochs": job["j_epochs"], "batch_size": job["batch"], "optimizer": "sgd", "lr": 0.01, "seed": 0,
             "augment": {"crop_size": job["crop"], "scale_range": [0.9, 1.1]}, **job.get("train", {})}
    torch.manual_seed(0)
    if importlib.util.find_spec("weakseg.steps.model_files") is None:  # a baseline from before the step model
        from weakseg.steps import infer_cam, train_cam

        config = {"dataset": job["dataset"], "model": job["model"], "loss": job.get("loss", {}), "train": train,
                  "out": str(work / "train")}
        (work / "c.yaml").write_text(yaml.safe_dump(config))
        result = train_cam.run(work / "c.yaml")
        (work / "d.yaml").write_text(yaml.safe_dump(job["dataset"]))
        return infer_cam.run(result["cam_model"], work / "d.yaml", work / "infer", [1.0], True)["miou"]
    from weakseg.steps import pipeline

    config = {"dataset": job["dataset"], "out": str(work / "run"), "infer_cam": {"scales": [1.0], "flip": True},
              "train_cam": {"model": job["model"], "loss": job.get("loss", {}), "train": train}}
    (work / "c.yaml").write_text(yaml.safe_dump(config))
    return pipeline.run(work / "c.yaml", log=lambda line: None)["stages"]["cam"]["miou"]


def child_data(job: dict) -> dict:
    import torch

    from weakseg.data import build_dataset
    from weakseg.data.transforms import AugmentConfig
    from weakseg.train import trainer

    dataset = build_dataset(job["dataset"])
    data = trainer.AugmentedDataset(dataset, AugmentConfig(crop_size=job["crop"], scale_range=[0.9, 1.1]), 0, False)
    batches = lambda epoch: [list(range(i, i + job["batch"])) for i in range(0, job["images"], job["batch"])]  # noqa: E731
    loader = trainer.make_loader(data, trainer._EpochBatchSampler(batches), job["workers"], torch.device("cpu"))
    iterator = iter(loader)
    next(iterator)  # workers started, first batch out
    start = time.perf_counter()
    count = sum(len(batch["rgb"]) for batch in iterator)
    return {"images_per_s": count / (time.perf_counter() - start)}


def child_infer(job: dict) -> dict:
    import torch

    from weakseg.data import build_dataset
    from weakseg.models.factory import ModelConfig, SegModelConfig, build_model, build_seg_model

    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    dataset = build_dataset(job["dataset"])
    dataset.ids = dataset.ids[: job["images"]]
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    step_model = importlib.util.find_spec("weakseg.steps.model_files") is not None  # False: a baseline from before issue 15
    if job["kind"] == "cam_infer":
        from weakseg.steps import infer_cam

        config = ModelConfig(**job["model"])
        save = getattr(importlib.import_module("weakseg.steps.model_files" if step_model else "weakseg.steps.train_cam"),
                       "save_cam_model")
        save(work / "cam_model.pt", build_model(config, len(dataset.foreground_ids)), config, dataset)
        if step_model:
            settings = infer_cam.InferCamConfig(scales=[1.0], flip=True)
            run = lambda: infer_cam.infer_cams(work / "cam_model.pt", dataset, work / "out", settings)  # noqa: E731
        else:
            run = lambda: infer_cam.run(work / "cam_model.pt", dataset, work / "out", [1.0], True)  # noqa: E731
    else:
        from weakseg.steps import predict

        config = SegModelConfig(**job["model"])
        save = getattr(importlib.import_module("weakseg.steps.model_files" if step_model else "weakseg.steps.train_seg"),
                       "save_seg_model")
        save(work / "seg_model.pt", build_seg_model(config, dataset.num_classes), config, dataset)
        if step_model:
            settings = predict.PredictConfig([1.0], True)
            run = lambda: predict.predict(work / "seg_model.pt", dataset, work / "out", settings)  # noqa: E731
        else:
            run = lambda: predict.run(work / "seg_model.pt", dataset, work / "out", predict.SegInferConfig([1.0], True))  # noqa: E731
    start = time.perf_counter()
    run()
    return {"images_per_s": job["images"] / (time.perf_counter() - start)}


def child_eval(job: dict) -> dict:
    from weakseg.steps import evaluate

    start = time.perf_counter()
    summary = evaluate.run(job["pred"], job["gt"])
    seconds = time.perf_counter() - start
    return {"images_per_s": summary["num_images"] / seconds, "miou": summary["miou"]}


CHILDREN = {"train": child_train, "data": child_data, "infer": child_infer, "eval": child_eval}


# --------------------------------------------------------------------------- parent side


def run_child(tree: Path, job: dict, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_tree(commit: str) -> Path:
    where = Path(tempfile.mkdtemp(prefix="weakseg-baseline-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "weakseg"], capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    return where


def shifted_predictions(gt_dir: Path) -> Path:
    """Predictions for the eval rows: each mask shifted by (3, -4) px, void as background,
    and a 40 px square of another class (a deterministic, imperfect prediction)."""
    import numpy as np
    from PIL import Image

    out = Path(tempfile.mkdtemp(prefix="weakseg-eval-"))
    rng = np.random.default_rng(0)
    for path in sorted(gt_dir.glob("*.png")):
        mask = np.array(Image.open(path))
        pred = np.roll(mask, (3, -4), axis=(0, 1))
        pred[pred == 255] = 0
        y, x = rng.integers(0, max(1, pred.shape[0] - 40)), rng.integers(0, max(1, pred.shape[1] - 40))
        pred[y : y + 40, x : x + 40] = rng.integers(1, 21)
        Image.fromarray(pred.astype(np.uint8)).save(out / path.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="4942548", help="commit to compare with (default: before the engine issue)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per row (the first two are warm-up)")
    parser.add_argument("--infer-images", type=int, default=24)
    parser.add_argument("--j-epochs", type=int, default=3, help="epochs of the fixed-seed fp32/bf16 J comparison (0: skip)")
    parser.add_argument("--only", nargs="*", default=["cam", "seam", "vit", "deeplab", "data", "infer", "eval"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(CHILDREN[job["child"]](job)))
        return

    threads = os.cpu_count() or 1
    base, current = baseline_tree(args.baseline), REPO
    data = dataset_config()
    print(f"data: {data['kind']}; torch threads: {threads}; baseline: {args.baseline} ({base})\n")
    # ImageNet weights (installed with the package's test requirements), so the J column means something.
    lite = {"backbone": "efficientnet_lite0", "backbone_args": {"pretrained": True, "output_stride": 16}}
    train_rows = {
        "cam": ("CAM Lite0 256 px, batch 8", {"kind": "cam", "model": lite, "crop": 256, "batch": 8}),
        "seam": ("SEAM Lite0 256 px, batch 8", {"kind": "seam", "model": {**lite, "method": "seam"}, "crop": 256,
                                                "batch": 8, "loss": {"seam": {}}}),
        "vit": ("ViT CAM DeiT-S 224 px, batch 8", {"kind": "vit", "model": {"method": "vit_cam", "backbone": "deit_small"},
                                                   "crop": 224, "batch": 8, "loss": {"reads": ["cams_coarse", "cams_fine"]}}),
        "deeplab": ("DeepLab Lite0 256 px, batch 8", {"kind": "deeplab", "model": {**lite, "aspp_channels": 128},
                                                      "crop": 256, "batch": 8}),
    }
    options = [
        ("baseline", base, {}, {}),
        ("now, workers 0", current, {"workers": 0}, {}),
        ("+ workers (default)", current, {}, {}),
        ("+ channels_last", current, {"channels_last": True}, {}),
        ("+ bf16", current, {"channels_last": True, "precision": "bf16"}, {}),
        ("+ freeze_stages 2", current, {"channels_last": True, "precision": "bf16"}, {"freeze_stages": 2}),
    ]
    for key, (title, job) in train_rows.items():
        if key not in args.only:
            continue
        print(f"## train: {title}\n\n| code and options | images/s | vs baseline | data wait | CAM J ({args.j_epochs} epochs) |\n"
              "|---|---|---|---|---|")
        reference = None
        for name, tree, train_opts, model_opts in options:
            if key == "vit" and "freeze" in name:
                model_opts = {"freeze_stages": 1}
            steps = args.steps if key != "vit" else max(4, args.steps // 2)
            with_j = args.j_epochs and key == "cam" and name in ("+ channels_last", "+ bf16")
            child = {"child": "train", "dataset": data, **job, "steps": steps, "train": train_opts,
                     "model": {**job["model"], **model_opts}, "j_epochs": args.j_epochs if with_j else 0}
            result = run_child(tree, child, threads)
            if "images_per_s" not in result:
                print(f"| {name} | n/a ({result.get('na') or result.get('error')}) | | | |")
                continue
            reference = reference or result["images_per_s"]
            j = f"{100 * result['cam_j']:.2f}" if "cam_j" in result else ""
            wait = result.get("data_wait")
            wait = f"{100 * wait:.1f} %" if wait is not None else "n/a"
            print(f"| {name} | {result['images_per_s']:.2f} | {result['images_per_s'] / reference:.2f}x | {wait} | {j} |")
        print()
    if "data" in args.only:
        print("## data pipeline alone (decode + augment + batch; 256 px crops, batch 8)\n\n| workers | images/s |\n|---|---|")
        for workers in (0, 1, 2):
            result = run_child(current, {"child": "data", "dataset": data, "crop": 256, "batch": 8, "images": 96,
                                         "workers": workers}, threads)
            print(f"| {workers} | {result.get('images_per_s', float('nan')):.1f} |")
        print()
    if "infer" in args.only:
        print("## inference (scale 1 + flip, Lite0)\n\n| step | threads | baseline images/s | now images/s | speed-up |\n|---|---|---|---|---|")
        for kind, model, label in (("cam_infer", lite, "infer-cam"), ("seg_infer", {**lite, "aspp_channels": 128}, "predict")):
            for t in ((threads, 1) if kind == "cam_infer" else (threads,)):
                job = {"child": "infer", "kind": kind, "dataset": data, "model": model, "images": args.infer_images, "threads": t}
                before, after = run_child(base, job, t), run_child(current, job, t)
                b, a = before.get("images_per_s", float("nan")), after.get("images_per_s", float("nan"))
                print(f"| {label} | {t} | {b:.2f} | {a:.2f} | {a / b:.2f}x |")
        print()
    if "eval" in args.only and (VOC / "SegmentationClass").is_dir():
        pred = shifted_predictions(VOC / "SegmentationClass")
        job = {"child": "eval", "pred": str(pred), "gt": str(VOC / "SegmentationClass")}
        before, after = run_child(base, job, 1), run_child(current, job, 1)
        print("## weakseg eval (330 VOC masks: J + F + boundary IoU)\n\n| code | images/s | J |\n|---|---|---|")
        for name, result in (("baseline", before), ("now", after)):
            print(f"| {name} | {result.get('images_per_s', float('nan')):.1f} | {result.get('miou', float('nan')):.4f} |")


if __name__ == "__main__":
    main()
