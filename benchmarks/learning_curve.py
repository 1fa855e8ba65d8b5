"""Held-back learning curve of a recipe: train on the images not held back and score the
held-back images after every k-th epoch, until held-back J has not risen for `--patience`
evaluations (or `--max-epochs` is reached).

    # the CAM network (--stage cam, the default); --score prediction for a network that
    # segments itself (configs/voc_shape_cues.yaml)
    python benchmarks/learning_curve.py --dataset voc --holdout 3 [--config voc_cam_gap.yaml] [--score prediction]
        [--max-epochs 60] [--every 1] [--patience 3] [--threads 2] [--out runs/learning_curve]
        [--png docs/img/learning_curve_voc_cam.png]
    # the final segmentation network on a run's fixed pseudo-labels
    python benchmarks/learning_curve.py --stage seg --run runs/voc_cpu [--max-epochs 40] [--every 2]
    # the AffinityNet on a run's CAMs, judged by its random walk on the held-back CAMs
    python benchmarks/learning_curve.py --stage affinity --run runs/voc_cpu [--tag T] [overrides]
    # an AuxSegNet+ stage on a run's round-R labels (configs/voc_auxsegnet.yaml)
    python benchmarks/learning_curve.py --stage label_rounds --run runs/voc_auxsegnet [--round R] [--every 1]

CAM stage: the split is cam_real_data.py's (`--holdout K`: every K-th image of the sorted ids
held back; the dataset key `holdout` makes the same split). Training is the trainer `weakseg
train-cam` runs, on the kept images, with `train_cam.train.epochs=MAX` (the poly learning rate
decays over MAX epochs: the curve answers "how long until held-back J stops rising under this
schedule"; a recipe set to the flattening epoch then decays over its own, shorter schedule
and is re-measured on its own). The held-back CAMs are the infer_cam step's
(`infer_cam.scales` from the config unless `--scales`), scored with its background sweep
(VOC) or argmax (NYUv2). Writes OUT/<dataset>_holdoutK/<config>/curve.json.

Seg stage: RUN is a pipeline run folder whose config has an `eval_dataset` (the held-back
images, e.g. configs/voc_cpu.yaml) and whose pseudo_labels step finished. The network is the
one `weakseg train-seg` trains (train_seg.model, its loss terms, train_seg.train with
epochs=MAX; weakseg.steps.train_seg.build_network and fit), on RUN's pseudo-labels; the held-back images are predicted as the predict step does (its scales, flip
and CRF unless `--scales`) and scored by the evaluate step's code. Writes
RUN/curve_train_seg/seedS/curve.json (`--tag T`: RUN/curve_train_seg/T_seedS, for a curve
with other overrides).

Affinity stage: RUN as for the seg stage, with its infer_cam step finished on the training
images and on the held-back ones (RUN/heldback/infer_cam, written by `pipeline_real_data.py
--heldback`). The AffinityNet is the one `weakseg train-affinity` trains (train_affinity from
RUN's config and the overrides, with epochs=MAX) on the training images' CAMs; after each
scored epoch its random walk (refine.walk) refines the held-back CAMs with refine.background,
as the refine step does, and the argmax is scored against the held-back masks. Writes
RUN/curve_train_affinity/[T_]seedS/curve.json. The walk's J is the AffinityNet's only judge:
its own loss says how well it fits the confident-region labels, not whether the walk helps.

Label-rounds stage: RUN as for the seg stage, an AuxSegNet+ run (label_rounds in its config)
whose round R finished (RUN/label_rounds/round_R/metrics.json). The network is the one stage R
of `weakseg label-rounds` trains: it starts from the weights stage R starts from (train_cam's
network for R = 0, stage R-1's after), and trains with label_rounds.train (epochs=MAX) and
eq. 19 on round R's labels. The held-back images are segmented as the predict step does with
`predict.network: label_rounds` (seg_pairwise, its scales and flip) and scored; the held-back
CAMs of the classification branch go along as the "cam" variant. The stage's own stopping rule
(patience on the training loss) plays no part. Writes RUN/curve_label_rounds/[T_]roundR_seedS/.

curve.json is written after every evaluation, and the PNG at the end; an interrupted curve
resumes from the trainer's checkpoint, and a finished one is only printed and drawn again
(e.g. with another `--png`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from weakseg.data import build_dataset, dataset_from_file
from weakseg.data.io import write_text_atomic
from weakseg.metrics.evaluator import SegEvaluator
from weakseg.models.factory import build_model
from weakseg.report.curves import Series, line_chart_png
from weakseg.steps import evaluate, infer_cam, pipeline, predict, refine
from weakseg.steps.model_files import CAM_MODEL, save_cam_model, save_seg_model
from weakseg.train.trainer import EpochLine, train

from cam_real_data import ROOT, SCHEDULE, dataset_override, write_holdout_split

WALK_INPUTS = ("scores", "probs", "cams")  # refine.walk.input; the affinity curve scores each

DEFAULT_CONFIG = {"voc": "voc_cam_gap.yaml", "nyu": "nyu_cam_gap.yaml"}


class Converged(Exception):
    """Raised from the epoch callback to end training once held-back J has stopped rising."""


def stopped_rising(js: list[float], patience: int, min_delta: float = 0.0) -> bool:
    """True when none of the last `patience` values beats the best before them by more than
    `min_delta`."""
    if len(js) <= patience:
        return False
    best_before = max(js[:-patience])
    return all(j <= best_before + min_delta for j in js[-patience:])


def cam_stage(args) -> dict:
    """What the curve of a CAM recipe trains and how it scores the held-back images."""
    config_file = args.config or DEFAULT_CONFIG[args.dataset]
    split = args.out / f"{args.dataset}_holdout{args.holdout}"
    train_yaml, heldback_yaml = write_holdout_split(args.dataset, args.holdout, split)
    folder = split / (Path(config_file).stem + (f"_{args.tag}" if args.tag else "")) / f"seed{args.seed}"
    overrides = (SCHEDULE[args.dataset] + [dataset_override(train_yaml)] + list(args.overrides)
                 + [f"train_cam.train.epochs={args.max_epochs}", f"train_cam.train.seed={args.seed}"])
    config, base_dir = pipeline.load_config(ROOT / "configs" / config_file, overrides)
    dataset = build_dataset(config.dataset, base_dir)
    heldback = dataset_from_file(heldback_yaml)
    infer_config = config.infer_cam or infer_cam.InferCamConfig()
    if args.scales:
        infer_config = replace(infer_config, scales=list(args.scales))
    cam = config.train_cam
    model = build_model(cam.model, len(dataset.foreground_ids))

    def score() -> dict:
        model_file = folder / "curve_model.pt"
        save_cam_model(model_file, model, cam.model, dataset)
        scored = folder / "heldback_cams"
        metrics = infer_cam.infer_cams(model_file, heldback, scored, infer_config)
        shutil.rmtree(scored)
        if args.score == "cams":
            return metrics
        # A single-stage method (shape_cues) segments the images itself: its decoder's argmax
        # is the curve's judge, as the predict and evaluate steps make and score it; the CAM
        # metrics go along as the "cam" variant.
        predicted = folder / "heldback_pred"
        predict.predict(model_file, heldback, predicted, predict.PredictConfig(scales=list(infer_config.scales),
                                                                               flip=infer_config.flip, network="train_cam"))
        final = evaluate.evaluate_dataset(predicted / "pred", heldback, predicted)
        shutil.rmtree(predicted)
        return dict(final, variants={"cam": {k: metrics[k] for k in ("miou", "contour_f", "jf")}})

    def fit(on_epoch) -> None:
        train(model, dataset, cam.loss, cam.train, folder / "train_cam", background_channel=model.background_channel,
              on_epoch=on_epoch)

    return {"folder": folder, "name": config_file, "label": f"{config_file} on {args.dataset} (holdout {args.holdout}: "
            f"{len(dataset)} train, {len(heldback)} held back), seed {args.seed}",
            "header": {"config": config_file, "overrides": overrides, "dataset": args.dataset, "holdout": args.holdout,
                       "train_images": len(dataset), "heldback_images": len(heldback), "scales": infer_config.scales,
                       "flip": infer_config.flip, "score": args.score},
            "score": score, "fit": fit}


def seg_stage(args) -> dict:
    """The final network of run `args.run`, trained on its pseudo-labels, scored on its
    eval_dataset."""
    if args.run is None:
        raise SystemExit("--stage seg needs --run RUN (a pipeline run folder whose pseudo_labels step finished)")
    run_dir = args.run.resolve()
    labels = run_dir / "pseudo_labels"
    if not (labels / "done.json").is_file():
        raise SystemExit(f"{labels}: the pseudo_labels step has not finished; run `weakseg run CONFIG --to pseudo_labels`")
    overrides = list(args.overrides) + [f"train_seg.train.epochs={args.max_epochs}", f"train_seg.train.seed={args.seed}"]
    config, base_dir = pipeline.load_config(run_dir / "config.yaml", overrides)
    if config.eval_dataset is None:
        raise SystemExit(f"{run_dir / 'config.yaml'}: no eval_dataset; the curve scores held-back images "
                         "(e.g. dataset and eval_dataset with `holdout`, as in configs/voc_cpu.yaml)")
    dataset = build_dataset(config.dataset, base_dir)
    heldback = build_dataset(config.eval_dataset, base_dir, prefix="eval_dataset")
    seg = config.train_seg or pipeline.train_seg.TrainSegConfig()
    predict_config = config.predict or predict.PredictConfig()
    if args.scales:
        predict_config = replace(predict_config, scales=list(args.scales))
    folder = run_dir / "curve_train_seg" / (f"{args.tag}_seed{args.seed}" if args.tag else f"seed{args.seed}")
    model = pipeline.train_seg.build_network(seg, dataset, run_dir / CAM_MODEL if seg.backbone_from == "train_cam" else None)

    def score() -> dict:
        model_file = folder / "curve_model.pt"
        save_seg_model(model_file, model, seg.model, dataset)
        scored = folder / "heldback_pred"
        predict.predict(model_file, heldback, scored, predict_config)
        metrics = evaluate.evaluate_dataset(scored / "pred", heldback, scored)
        shutil.rmtree(scored)
        return metrics

    def fit(on_epoch) -> None:
        pipeline.train_seg.fit(model, seg, dataset, labels, folder / "train_seg", on_epoch=on_epoch)

    return {"folder": folder, "name": f"{run_dir.name} train_seg",
            "label": f"final network of {run_dir.name} on its pseudo-labels ({len(dataset)} train, "
                     f"{len(heldback)} held back), seed {args.seed}",
            "header": {"run": str(run_dir), "overrides": overrides, "train_images": len(dataset),
                       "heldback_images": len(heldback), "scales": predict_config.scales, "flip": predict_config.flip,
                       "crf": predict_config.crf},
            "score": score, "fit": fit}


def affinity_stage(args) -> dict:
    """The AffinityNet of run `args.run`, trained on its training images' CAMs, judged by
    the random walk's J on its held-back CAMs."""
    if args.run is None:
        raise SystemExit("--stage affinity needs --run RUN (a pipeline run folder whose infer_cam step finished)")
    run_dir = args.run.resolve()
    heldback_cams = run_dir / "heldback" / "infer_cam"
    for folder, how in ((run_dir / "infer_cam", "weakseg run CONFIG --to infer_cam"),
                        (heldback_cams, "python benchmarks/pipeline_real_data.py --config CONFIG --heldback --to infer_cam")):
        if not (folder / "cams").is_dir():
            raise SystemExit(f"{folder / 'cams'}: no CAMs; run `{how}` first")
    overrides = list(args.overrides) + [f"train_affinity.train.epochs={args.max_epochs}",
                                        f"train_affinity.train.seed={args.seed}"]
    config, base_dir = pipeline.load_config(run_dir / "config.yaml", overrides)
    if config.eval_dataset is None:
        raise SystemExit(f"{run_dir / 'config.yaml'}: no eval_dataset to score the walk on")
    dataset = build_dataset(config.dataset, base_dir)
    heldback = build_dataset(config.eval_dataset, base_dir, prefix="eval_dataset")
    aff = config.train_affinity or pipeline.train_affinity.TrainAffinityConfig()
    refine_config = config.refine or refine.RefineConfig()
    walk = refine_config.walk
    folder = run_dir / "curve_train_affinity" / (f"{args.tag}_seed{args.seed}" if args.tag else f"seed{args.seed}")
    import torch

    from weakseg.refine.affinity import AffinityNet, RandomWalk
    from weakseg.train.affinity import train_affinity

    torch.manual_seed(aff.train.seed)  # as the train_affinity step does before it builds the network
    model = AffinityNet(aff.backbone, aff.dim, **aff.backbone_args)

    inputs = [refine_config.walk.input] + [v for v in WALK_INPUTS if v != refine_config.walk.input]
    if refine_config.background == "model":
        inputs = ["probs"]  # the network's probabilities are its scores; cams needs a CAM background score
    variants = {name: replace(refine_config, method="affinity_rw", walk=replace(walk, input=name)) for name in inputs}

    def score() -> dict:
        walker = RandomWalk(model, walk.beta, walk.log_t, walk.radius, pairs=walk.pairs)
        evaluators = {name: SegEvaluator(heldback.class_names, heldback.background_index) for name in inputs}
        for i in range(len(heldback)):
            sample = heldback[i]
            cam_file = heldback_cams / "cams" / f"{sample.id}.npz"
            cams, class_ids = refine.load_cams(cam_file)
            model_probs = refine.load_model_probs(cam_file) if refine_config.background == "model" else None
            for name, variant in variants.items():  # one forward pass per image (the walker keeps its features)
                probs, ids = refine.image_probs(cams, class_ids, sample.image, heldback.background_index, variant,
                                                walker, model_probs)
                evaluators[name].add(ids[probs.argmax(axis=0)].astype(np.uint8), sample.mask)
        model.train()  # RandomWalk put it in eval mode
        metrics = {name: evaluator.headline() for name, evaluator in evaluators.items()}
        return dict(metrics[inputs[0]], variants={name: {k: m[k] for k in ("miou", "contour_f")}
                                                  for name, m in metrics.items()})

    def fit(on_epoch) -> None:
        train_affinity(model, dataset, run_dir / "infer_cam", aff.train, folder / "train_affinity", radius=aff.radius,
                       pairs=aff.pairs, alphas=aff.alphas(), on_epoch=on_epoch)

    low, high = aff.alphas()
    return {"folder": folder, "name": f"{run_dir.name} train_affinity",
            "label": f"AffinityNet of {run_dir.name}: walk on held-back CAMs ({len(dataset)} train, "
                     f"{len(heldback)} held back), seed {args.seed}",
            "header": {"run": str(run_dir), "overrides": overrides, "train_images": len(dataset),
                       "heldback_images": len(heldback), "alphas": [low, high], "backbone": aff.backbone,
                       "backbone_args": aff.backbone_args, "background": refine_config.background,
                       "background_constant": refine_config.background_constant,
                       "background_alpha": refine_config.background_alpha,
                       "walk": {"beta": walk.beta, "log_t": walk.log_t, "radius": walk.radius, "input": walk.input},
                       "walk_inputs_scored": inputs},
            "score": score, "fit": fit}


def label_rounds_stage(args) -> dict:
    """Stage `args.round` of AuxSegNet+ run `args.run`, on that round's labels, scored on the
    run's eval_dataset by the network's own segmentation."""
    if args.run is None:
        raise SystemExit("--stage label_rounds needs --run RUN (an auxsegnet run folder whose round R finished)")
    run_dir = args.run.resolve()
    rounds_dir = run_dir / "label_rounds"
    round_dir = rounds_dir / f"round_{args.round}"
    if not (round_dir / "metrics.json").is_file():
        raise SystemExit(f"{round_dir}: round {args.round} has not finished; run `weakseg label-rounds` until it has")
    start = run_dir / CAM_MODEL if args.round == 0 else rounds_dir / f"stage_{args.round - 1}" / "model.pt"
    if not start.is_file():
        raise SystemExit(f"{start}: the network stage {args.round} starts from is missing")
    overrides = list(args.overrides) + [f"label_rounds.train.epochs={args.max_epochs}",
                                        f"label_rounds.train.seed={args.seed}"]
    config, base_dir = pipeline.load_config(run_dir / "config.yaml", overrides)
    if config.eval_dataset is None or config.label_rounds is None:
        raise SystemExit(f"{run_dir / 'config.yaml'}: needs label_rounds and an eval_dataset (held-back images)")
    dataset = build_dataset(config.dataset, base_dir)
    heldback = build_dataset(config.eval_dataset, base_dir, prefix="eval_dataset")
    rounds = config.label_rounds
    predict_config = replace(config.predict or predict.PredictConfig(), network="label_rounds")
    if args.scales:
        predict_config = replace(predict_config, scales=list(args.scales))
    folder = run_dir / "curve_label_rounds" / ((f"{args.tag}_" if args.tag else "") + f"round{args.round}_seed{args.seed}")
    import torch

    from weakseg.models.factory import ModelConfig
    from weakseg.config import from_mapping
    from weakseg.steps.label_rounds import RoundTargets, check_model, stage_terms
    from weakseg.steps.model_files import load_cam_model
    from weakseg.train.trainer import train as train_stage

    model, state = load_cam_model(start, "cpu")
    check_model(model, state, dataset, start)
    model_config = from_mapping(ModelConfig, state["model_config"], "model")
    infer_config = config.infer_cam or infer_cam.InferCamConfig()

    def score() -> dict:
        model_file = folder / "curve_model.pt"
        save_cam_model(model_file, model, model_config, dataset)
        predicted = folder / "heldback_pred"
        predict.predict(model_file, heldback, predicted, predict_config)
        metrics = evaluate.evaluate_dataset(predicted / "pred", heldback, predicted)
        shutil.rmtree(predicted)
        scored = folder / "heldback_cams"
        cams = infer_cam.infer_cams(model_file, heldback, scored, infer_config)
        shutil.rmtree(scored)
        return dict(metrics, variants={"cam": {k: cams[k] for k in ("miou", "contour_f", "jf")}})

    def fit(on_epoch) -> None:
        torch.manual_seed(rounds.train.seed + args.round)  # as label_rounds does before stage R
        train_stage(model, dataset, stage_terms(model, rounds.loss), rounds.train, folder / "train_label_rounds",
                    masks=RoundTargets(round_dir, dataset.num_classes, rounds.saliency_label_threshold),
                    on_epoch=on_epoch)

    return {"folder": folder, "name": f"{run_dir.name} label_rounds stage {args.round}",
            "label": f"AuxSegNet+ stage {args.round} of {run_dir.name} on round-{args.round} labels "
                     f"({len(dataset)} train, {len(heldback)} held back), seed {args.seed}",
            "header": {"run": str(run_dir), "round": args.round, "starts_from": str(start), "overrides": overrides,
                       "train_images": len(dataset), "heldback_images": len(heldback),
                       "scales": predict_config.scales, "flip": predict_config.flip},
            "score": score, "fit": fit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("cam", "seg", "affinity", "label_rounds"), default="cam")
    parser.add_argument("--dataset", choices=sorted(DEFAULT_CONFIG), help="--stage cam: the dataset")
    parser.add_argument("--config", default=None, help="--stage cam: CAM config in configs/ (default: the GAP baseline)")
    parser.add_argument("--run", type=Path, default=None, help="--stage seg, affinity, label_rounds: the pipeline "
                        "run folder")
    parser.add_argument("--round", type=int, default=0, help="--stage label_rounds: the round whose labels stage R "
                        "trains on")
    parser.add_argument("--holdout", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--every", type=int, default=1, help="evaluate after every k-th epoch")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--min-delta", type=float, default=0.0, help="a rise smaller than this does not count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="held-back inference scales")
    parser.add_argument("--score", choices=("cams", "prediction"), default="cams",
                        help="--stage cam: score the held-back CAMs, or (a single-stage method such as shape_cues) "
                        "the network's own segmentation, with the CAMs as a variant")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/learning_curve"), help="--stage cam: where curves go")
    parser.add_argument("--tag", default=None, help="a name for this curve's folder (curves with other overrides of "
                        "the same config or run need their own)")
    parser.add_argument("--png", type=Path, default=None, help="where to draw the curve (default: beside curve.json)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. train_cam.train.batch_size=16")
    args = parser.parse_args()
    if args.stage == "cam" and args.dataset is None:
        parser.error("--stage cam needs --dataset")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stage = {"cam": cam_stage, "seg": seg_stage, "affinity": affinity_stage,
             "label_rounds": label_rounds_stage}[args.stage](args)
    folder = stage["folder"]
    trainer_folder = folder / f"train_{args.stage}"

    curve_path = folder / "curve.json"
    header = dict(stage["header"], stage=args.stage, max_epochs=args.max_epochs, every=args.every,
                  patience=args.patience, min_delta=args.min_delta)
    rows: list[dict] = []
    checkpoint = trainer_folder / "checkpoint.pt"
    recorded = json.loads(curve_path.read_text()) if curve_path.is_file() else None
    if recorded is not None and recorded["converged"]:  # finished: only print and draw it again
        rows = recorded["rows"]
    elif recorded is not None and checkpoint.is_file():  # resume: keep the rows the checkpoint has passed
        import torch

        done = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])
        rows = [r for r in recorded["rows"] if r["epoch"] <= done]
        print(f"resuming after epoch {done} ({len(rows)} evaluations kept)", flush=True)
    started = time.perf_counter() - (rows[-1]["seconds"] if rows else 0.0)
    print(f"{stage['label']}: up to {args.max_epochs} epochs, scored every {args.every}, patience {args.patience}",
          flush=True)

    def write_curve(converged: bool) -> None:
        best = max(rows, key=lambda r: r["miou"]) if rows else None
        record = dict(header, rows=rows, converged=converged, best_epoch=best and best["epoch"],
                      best_miou=best and best["miou"])
        write_text_atomic(curve_path, json.dumps(record, indent=2) + "\n")

    def on_epoch(line: EpochLine) -> None:
        epoch = line.epoch
        if epoch % args.every and epoch != args.max_epochs:
            return
        metrics = stage["score"]()
        rows.append({"epoch": epoch, "train_loss": line.loss, "miou": metrics["miou"], "contour_f": metrics["contour_f"],
                     "jf": metrics["jf"], "best_threshold": metrics.get("best_threshold"),
                     "seconds": time.perf_counter() - started,
                     **({"variants": metrics["variants"]} if "variants" in metrics else {})})
        others = "".join(f"; {name}: J {100 * m['miou']:.1f} F {100 * m['contour_f']:.1f}"
                         for name, m in metrics.get("variants", {}).items())
        print(f"epoch {epoch:3d}  held-back J {100 * metrics['miou']:5.1f}  F {100 * metrics['contour_f']:5.1f}  "
              f"({line.strip()}{others})", flush=True)
        converged = stopped_rising([r["miou"] for r in rows], args.patience, args.min_delta)
        write_curve(converged)
        if converged:
            raise Converged

    converged = False
    try:
        if rows and stopped_rising([r["miou"] for r in rows], args.patience, args.min_delta):
            raise Converged
        stage["fit"](on_epoch)
    except Converged:
        converged = True
    write_curve(converged)
    best = max(rows, key=lambda r: r["miou"])
    print(f"\n{'converged' if converged else 'NOT converged (max epochs reached)'}: best held-back J "
          f"{100 * best['miou']:.1f} at epoch {best['epoch']}; curve in {curve_path}\n")
    extra = [name for name in rows[-1].get("variants", {}) if name != header.get("walk", {}).get("input")]
    variant_label = "walk input " if "walk" in header else ""  # the affinity curve's variants are walk inputs
    print("| epoch | train loss | held-back J (%) | held-back F (%) | threshold | minutes |"
          + "".join(f" J, F {variant_label}{name} (%) |" for name in extra))
    print("|---|---|---|---|---|---|" + "---|" * len(extra))
    for r in rows:
        threshold = f"{r['best_threshold']:.2f}" if r.get("best_threshold") is not None else "argmax"
        cells = "".join(f" {100 * r['variants'][n]['miou']:.1f}, {100 * r['variants'][n]['contour_f']:.1f} |"
                        if n in r.get("variants", {}) else " |" for n in extra)
        print(f"| {r['epoch']} | {r['train_loss']:.3f} | {100 * r['miou']:.1f} | {100 * r['contour_f']:.1f} | {threshold} | "
              f"{r['seconds'] / 60:.1f} |{cells}")
    png = args.png or folder / "curve.png"
    epochs = [r["epoch"] for r in rows]
    primary = f", walk input {header['walk']['input']}" if "walk" in header else ""
    series = [Series(f"held-back J{primary}", epochs, [100 * r["miou"] for r in rows]),
              Series(f"held-back F{primary}", epochs, [100 * r["contour_f"] for r in rows])]
    names = [name for name in rows[-1].get("variants", {}) if name != header.get("walk", {}).get("input")]
    for name in names:  # the affinity curve's other walk inputs, the other curves' variants
        scored = [r for r in rows if name in r.get("variants", {})]
        series.append(Series(f"held-back J, {variant_label}{name}", [r["epoch"] for r in scored],
                             [100 * r["variants"][name]["miou"] for r in scored]))
    line_chart_png(png, series, stage["label"], "epoch", "%")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
