"""The one trainer (`fit`) for every network: CAM methods, the AffinityNet, the segmentation
network and the demo (docs/training.md).

- SGD with poly LR (icam Table 1: lr 0.01, momentum 0.9, weight decay 5e-4, power 0.9;
  head layers at 10x the backbone LR, as SEAM trains its new layers) or AdamW.
- Fixed seed: the sample order, the augmentation (a numpy generator per (seed, epoch,
  index)) and the ISL draws (a torch generator) all derive from `train.seed`.
- A DataLoader (`train.workers`) decodes and augments ahead of the model; since every sample
  is a function of (seed, epoch, index), the worker count never changes the weights.
- A checkpoint (model, optimiser, epoch) is written atomically after every epoch; a run
  directory with a checkpoint resumes from it.
- Every loss term's value is logged per step to `log.csv` (and to TensorBoard when the
  `tensorboard` package is installed).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from weakseg.data.base import SegDataset
from weakseg.data.io import atomic_path
from weakseg.errors import ConfigError, DataError, NonFiniteLoss, WeaksegError
from weakseg.data.transforms import AugmentConfig, build_augment
from weakseg.losses.base import LossTerm
from weakseg.losses.terms import LossConfig, build_terms
from weakseg.progress import duration_text
from weakseg.record import release_inherited_locks
from weakseg.train import distributed


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 8
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    head_lr_mult: float = 10.0
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_size=224, scale_range=[0.9, 1.1]))
    max_steps_per_epoch: int | None = None  # cap for smoke tests and CPU-sized runs
    # DataLoader processes that decode and augment ahead of the model; null: default_workers().
    # Any count gives bit-identical weights (augmentation is seeded per (seed, epoch, index)).
    workers: int | None = None
    # Autocast dtype of forward and loss: fp32 (off), bf16 (CPU with AVX512-BF16/AMX, or
    # CUDA), fp16 (CUDA, with a gradient scaler). Weights and optimiser stay fp32.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # NHWC tensors for the convolutions: faster on CPU and tensor cores; the same maths,
    # summed in another order (results agree to float rounding, not bit for bit).
    channels_last: bool = False
    grad_clip: float | None = None  # max global gradient norm; null: no clipping


def pick_device(name: str) -> torch.device:
    """`auto`: this process's GPU when CUDA is there (LOCAL_RANK's under torchrun), else CPU."""
    return distributed.device_for(name)


class AugmentedDataset(torch.utils.data.Dataset):
    """Samples as training tensors, indexed by (epoch, index): the augmentation of a sample is
    a pure function of (seed, epoch, index), so any number of DataLoader workers, and a
    resumed run, see exactly the same crops and flips.

    `target(index, sample)` gives a per-sample training target (pseudo-labels, affinity
    labels: (H, W) uint8, 255 ignored), augmented with the image (nearest, padding 255) and
    batched as "mask"; an (H, W, 2) target is batched as "mask" (channel 0) and
    "saliency_mask" (channel 1). Ground-truth masks never reach training (weak supervision)."""

    def __init__(
        self,
        dataset: SegDataset,
        augment: AugmentConfig,
        seed: int,
        need_depth: bool,
        target: Callable[[int, object], np.ndarray] | None = None,
    ):
        self.dataset = dataset
        self.pipeline = build_augment(augment, "train.augment")
        self.seed = seed
        self.need_depth = need_depth
        self.target = target

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        try:
            return self._item(*key)
        except WeaksegError as exc:
            # Carried back as data: a DataLoader worker would re-raise it as a RuntimeError
            # holding a traceback, and the user would not get the one-line error naming the file.
            return {_FAILED: exc}

    def _item(self, epoch: int, index: int) -> dict:
        sample = self.dataset[index]
        if self.need_depth and sample.depth is None:
            raise DataError(sample.id, "a loss term needs depth but this sample has none")
        rng = np.random.default_rng([self.seed, epoch, index])
        target = self.target(index, sample) if self.target is not None else None
        image, target, depth = self.pipeline(sample.image, target, sample.depth, rng=rng)
        item = {
            # np.require copies read-only views (e.g. a cached sample) so torch may own the buffer.
            "rgb": torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float() / 255.0,
            "labels": torch.from_numpy(sample.labels),
        }
        if depth is not None and self.need_depth:
            item["depth"] = torch.from_numpy(np.require(depth, requirements=["C", "W"])).unsqueeze(0)
        if target is not None:
            target = torch.from_numpy(np.require(target, requirements=["C", "W"])).long()
            if target.dim() == 3:  # (H, W, 2): segmentation labels and saliency labels (AuxSegNet+)
                item["mask"], item["saliency_mask"] = target[..., 0].contiguous(), target[..., 1].contiguous()
            else:
                item["mask"] = target
        return item


_FAILED = "__weakseg_error__"


def collate(items: list[dict]) -> dict:
    """Stack the items of a batch key by key; images of different sizes are one clear error.
    A sample that failed (see AugmentedDataset) makes the batch its error."""
    for item in items:
        if _FAILED in item:
            return item
    shapes = {tuple(it["rgb"].shape) for it in items}
    if len(shapes) > 1:
        raise ConfigError(f"train.augment.crop_size: the images of a batch differ in size ({sorted(shapes)}); "
                          "set a crop size to batch them")
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}


def default_workers() -> int:
    """DataLoader workers when `train.workers` is unset: one core stays with the model, the
    others decode and augment (at most 4; 0 on a single core)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _worker_init(_: int) -> None:
    # Each worker decodes on one thread: the cores belong to the model's forward/backward.
    torch.set_num_threads(1)
    # A worker must not keep its parent's run-folder lock alive (weakseg.record).
    release_inherited_locks()


class _EpochBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's (epoch, index) keys of each step of `self.epoch` (set before each
    epoch in the main process, so persistent workers need no message)."""

    def __init__(self, batches: Callable[[int], list[list[int]]]):
        self.batches = batches
        self.epoch = 0

    def __iter__(self):
        for global_idx in self.batches(self.epoch):
            # A rank left without a sample (a last batch smaller than the world) runs one
            # sample at weight 0: DDP needs every rank in each gradient all-reduce.
            local = distributed.local_slice(global_idx) or global_idx[:1]
            yield [(self.epoch, i) for i in local]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


def make_loader(data: torch.utils.data.Dataset, sampler: _EpochBatchSampler, workers: int, device: torch.device):
    """A DataLoader over `sampler`'s batches: `workers` processes decode and augment ahead of
    the model (prefetching), persistent across epochs, pinned memory on CUDA."""
    return torch.utils.data.DataLoader(
        data,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        # Its own generator: an iterator otherwise draws its base seed from torch's global
        # generator, which would shift every later dropout mask (and differ from a run
        # without a DataLoader). The augmentation does not use torch's RNG at all.
        generator=torch.Generator().manual_seed(0),
    )


def _param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    mult = config.head_lr_mult if config.optimizer == "sgd" else 1.0
    return [{"params": backbone, "lr_mult": 1.0}, {"params": head, "lr_mult": mult}]


def build_optimizer(model: torch.nn.Module, extra: list[torch.nn.Parameter], config: TrainConfig):
    groups = _param_groups(model, config)
    if extra:
        groups.append({"params": extra, "lr_mult": 1.0, "weight_decay": 0.0})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to `path` atomically. Through a file handle: given a path, torch.save names
    the zip's inner folder after it (here a random temp name), so equal weights would differ
    byte for byte and run manifests of identical runs would not match."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(state, handle)
    except (OSError, RuntimeError) as err:
        # A full disk surfaces from torch's zip writer as "unexpected pos ..."; say what it is.
        # Free space of the nearest folder that exists (the write may have failed creating it).
        free_mb = shutil.disk_usage(next(p for p in path.parents if p.exists())).free / 2**20
        raise WeaksegError(f"{path}: could not write the checkpoint ({free_mb:.0f} MiB free on its disk): {err}") from err


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    # weights_only: a checkpoint is data, never code (issue 6: safe loading).
    return torch.load(path, map_location=map_location, weights_only=True)


def schedule_length(num_samples: int, config: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run, with `max_steps_per_epoch` applied."""
    steps_per_epoch = math.ceil(num_samples / config.batch_size)
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    return steps_per_epoch, config.epochs * steps_per_epoch


def epoch_batches(num_samples: int, config: TrainConfig, epoch: int, steps_per_epoch: int) -> list[list[int]]:
    """The sample indices of each step of an epoch: a permutation seeded by (seed, epoch), so a
    resumed run sees the same batches."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)).tolist()
    batches = [order[i * config.batch_size : (i + 1) * config.batch_size] for i in range(steps_per_epoch)]
    return [b for b in batches if b]


def poly_lr(base_lr: float, step: int, total: int, power: float) -> float:
    """lr = base_lr * (1 - step / total) ** power."""
    return base_lr * (1.0 - step / max(1, total)) ** power


def set_poly_lr(optimizer, config: TrainConfig, step: int, total_steps: int) -> float:
    """Poly learning rate of `step`, scaled per parameter group by its `lr_mult`."""
    lr = poly_lr(config.lr, step, total_steps, config.poly_power)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


def resume_from(checkpoint_path: Path, model: torch.nn.Module, optimizer) -> dict | None:
    """Load model and optimiser state from a run's last per-epoch checkpoint, if there is one;
    returns the checkpoint (epoch, epoch_losses, ...) or None."""
    if not checkpoint_path.exists():
        return None
    state = load_model_file(checkpoint_path, "epoch", "training checkpoint (no 'epoch')")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state


def global_rng_state() -> dict:
    """torch's global generator states, saved with each checkpoint. They drive dropout (and any
    other torch.rand in a forward pass): without them a resumed run would draw other dropout
    masks than the uninterrupted run from the resumed epoch on."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(checkpoint: dict) -> None:
    if "torch_rng" in checkpoint:
        torch.set_rng_state(checkpoint["torch_rng"])
    if "cuda_rng" in checkpoint and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])


def load_model_file(path: str | Path, required_key: str, what: str) -> dict:
    """A model file a step wrote (a dict with `required_key`); one DataError naming the file
    when it is missing, is not such a file, or holds code (refused by weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "checkpoint does not exist")
    try:
        state = load_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(path, f"not a weakseg checkpoint, or it holds code and was refused ({exc})") from None
    if not isinstance(state, dict) or required_key not in state:
        raise DataError(path, f"not a {what}")
    return state


class _Logger:
    def __init__(self, path: Path, names: list[str], resume_epoch: int):
        self.path = path
        self.names = names
        exists = path.exists() and resume_epoch > 0
        if exists:
            # Drop the rows of the epoch that was interrupted: it is trained again.
            rows = path.read_text(encoding="utf-8").splitlines()
            kept = [rows[0]] + [r for r in rows[1:] if r and int(r.split(",", 1)[0]) < resume_epoch]
            with atomic_path(path) as tmp:
                tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
        self.file = open(path, "a" if exists else "w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)
        if not exists:
            self.writer.writerow(["epoch", "step", "lr", "total"] + names)
        self.tb = None
        try:  # optional
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def log(self, epoch: int, step: int, lr: float, total: float, values: list[float]) -> None:
        self.writer.writerow([epoch, step, f"{lr:.6g}", f"{total:.6g}"] + [f"{v:.6g}" for v in values])
        self.file.flush()  # follow a long run with `tail -f log.csv`
        if self.tb is not None:
            self.tb.add_scalar("loss/total", total, step)
            for name, value in zip(self.names, values):
                self.tb.add_scalar(f"loss/{name}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def autocast(device: torch.device, precision: str):
    """The autocast context of `train.precision` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision: {precision!r}; allowed values: {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(
    model: torch.nn.Module,
    dataset: SegDataset,
    loss_config: LossConfig | Sequence[LossTerm],
    config: TrainConfig,
    out_dir: Path,
    background_channel: int | None = None,
    on_step=None,
    masks: Callable[[str], np.ndarray] | None = None,
    on_epoch: Callable[[str], None] | None = None,
    stop_when: Callable[[list[float]], bool] | None = None,
) -> dict:
    """Train `model` (outputs a dict of named maps) on `dataset`; returns {"epoch_losses": [...]}.

    `loss_config` is a `loss:` section (CAM methods) or ready loss terms (the segmentation
    network's cross-entropy); `masks` gives per-sample training targets by sample id,
    batched as "mask"."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    terms: list[LossTerm] = build_terms(loss_config, generator) if isinstance(loss_config, LossConfig) else list(loss_config)
    need_depth = any(getattr(t, "needs_depth", False) for t in terms)
    target = _TargetById(masks) if masks is not None else None
    data = AugmentedDataset(dataset, config.augment, config.seed, need_depth, target)
    return fit(model, data, terms, config, out_dir, background_channel, on_step, generator=generator, on_epoch=on_epoch,
               stop_when=stop_when)


class EpochLine(str):
    """The text `on_epoch` receives (a str, so a callback may just print it), carrying the
    epoch's numbers too, so that no caller parses the text: `epoch` (1-based), `loss` (the
    epoch's mean total loss) and `terms` (each term's mean, by name)."""

    epoch: int
    loss: float
    terms: dict[str, float]


def _epoch_line(epoch: int, epochs: int, total: float, terms, term_means: torch.Tensor, images: int,
                seconds: float) -> EpochLine:
    """'epoch 3/12: loss 0.5123 (cls 0.5000, fsl 0.0123); 41.2 images/s; ETA 2m10s'."""
    means = {t.name: float(v) for t, v in zip(terms, term_means)}
    parts = ", ".join(f"{name} {value:.4f}" for name, value in means.items())
    eta = duration_text(seconds * (epochs - epoch - 1))
    line = EpochLine(f"epoch {epoch + 1}/{epochs}: loss {total:.4f} ({parts}); "
                     f"{images / max(seconds, 1e-9):.1f} images/s; ETA {eta}")
    line.epoch, line.loss, line.terms = epoch + 1, float(total), means
    return line


class _TargetById:
    """(index, sample) -> masks(sample.id); picklable (unlike a lambda) for spawned workers."""

    def __init__(self, masks: Callable[[str], np.ndarray]):
        self.masks = masks

    def __call__(self, index: int, sample) -> np.ndarray:
        return self.masks(sample.id)


def _as_outputs(outputs) -> dict[str, torch.Tensor]:
    """A network returning one tensor (AffinityNet's features) is read as {"features": it}."""
    return outputs if isinstance(outputs, dict) else {"features": outputs}


def fit(
    model: torch.nn.Module,
    data: torch.utils.data.Dataset,
    terms: Sequence[LossTerm],
    config: TrainConfig,
    out_dir: Path,
    background_channel: int | None = None,
    on_step=None,
    generator: torch.Generator | None = None,
    checkpoint_extra: dict | None = None,
    on_epoch: Callable[[str], None] | None = None,
    stop_when: Callable[[list[float]], bool] | None = None,
) -> dict:
    """The one training loop of weakseg: CAM methods, the AffinityNet and the segmentation
    network all come through here.

    `data[(epoch, index)]` gives one sample's tensors ("rgb" (3, H, W) in [0, 1], "labels",
    optionally "mask", "depth"); the sum of `term.weight_at(epoch, progress) * term(outputs, batch)` is
    minimised. Per step: this rank's slice of a seeded global batch, loaded by a DataLoader,
    poly LR, autocast (`precision`), backward, optional clipping, step; the global mean of each
    term is logged to log.csv and checked for finiteness (NonFiniteLoss). After every epoch a
    checkpoint (model, optimiser, terms, RNG states, `checkpoint_extra`) is written atomically;
    a run folder holding one resumes from it. `on_epoch` receives one line per epoch (the
    epoch's mean losses, images/s, ETA), for logs where no progress bar shows; the line is an
    EpochLine, which also carries those numbers. `stop_when(epoch_losses)` (e.g.
    `patience_stop`), asked after each epoch's checkpoint and on resuming, ends training early
    when it returns True; the result's `stopped_epoch` says after which epoch (None: ran all)."""
    distributed.setup()
    main = distributed.is_main()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    generator = generator if generator is not None else torch.Generator().manual_seed(config.seed + 1)
    terms = list(terms)
    extra = [p for term in terms for p in term.parameters()]
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    optimizer = build_optimizer(model, extra, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    steps_per_epoch, total_steps = schedule_length(len(data), config)
    workers = default_workers() if config.workers is None else config.workers
    if workers < 0:
        raise ConfigError(f"train.workers: must be >= 0 (or null for the default), got {workers}")

    checkpoint_path = out_dir / "checkpoint.pt"
    start_epoch, epoch_losses = 0, []
    state = resume_from(checkpoint_path, model, optimizer)
    if state is not None:
        for term, term_state in zip(terms, state.get("terms", [])):
            term.load_state_dict(term_state)
        start_epoch, epoch_losses = int(state["epoch"]), list(state["epoch_losses"])
        if "isl_generator" in state:
            generator.set_state(state["isl_generator"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        restore_global_rng(state)
    net = distributed.wrap(model, device)  # DDP under torchrun, else the model itself
    logger = _Logger(out_dir / "log.csv", [t.name for t in terms], resume_epoch=start_epoch) if main else None
    batches = lambda epoch: epoch_batches(len(data), config, epoch, steps_per_epoch)  # noqa: E731
    sampler = _EpochBatchSampler(batches)
    stopped = start_epoch if stop_when is not None and epoch_losses and stop_when(epoch_losses) else None
    last_epoch = config.epochs if stopped is None else start_epoch
    loader = make_loader(data, sampler, workers, device) if start_epoch < last_epoch else None
    waited = looped = received = 0.0  # seconds blocked on the loader, of the loop; last batch time
    try:
        for epoch in range(start_epoch, last_epoch):
            sampler.epoch = epoch
            model.train()
            running, seen = 0.0, 0
            term_sums = torch.zeros(len(terms))
            epoch_started = time.perf_counter()
            iterator = iter(loader)
            for step_in_epoch, global_idx in enumerate(batches(epoch)):
                started = time.perf_counter()
                batch = next(iterator)
                if _FAILED in batch:
                    raise batch[_FAILED]  # the sample's own error (pickled whole by the worker)
                now = time.perf_counter()
                # The first batch of an epoch also waits for the workers to start: not a steady wait.
                if step_in_epoch > 0:
                    waited += now - started
                    looped += now - received
                received = now
                n_local = len(distributed.local_slice(global_idx))
                scale = distributed.loss_scale(n_local, len(global_idx))
                batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                rgb = batch["rgb"].contiguous(memory_format=memory_format)  # the network normalises it
                step = epoch * steps_per_epoch + step_in_epoch
                lr = set_poly_lr(optimizer, config, step, total_steps)
                with autocast(device, config.precision):
                    outputs = _as_outputs(net(rgb))
                    values = [term(outputs, batch, background_channel) for term in terms]
                    total = sum(term.weight_at(epoch, step / total_steps) * v for term, v in zip(terms, values))
                # Global batch means of every term (sums over ranks of n_r * mean_r), so the
                # log and the finiteness check are the same on every rank and equal to a
                # single-process run's.
                means = distributed.all_sum(torch.stack([v.detach().float() * float(n_local) for v in values]
                                                        + [total.detach().float() * float(n_local)])) / len(global_idx)
                if not torch.isfinite(means).all():
                    bad = [t.name for t, v in zip(terms, means[:-1]) if not torch.isfinite(v)]
                    raise NonFiniteLoss(
                        f"non-finite loss (term {', '.join(bad) or 'total'}) at epoch {epoch + 1}, step {step + 1}; "
                        f"last good checkpoint: {checkpoint_path if checkpoint_path.exists() else 'none (first epoch)'}"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total * scale).backward()
                distributed.average_gradients(extra)  # DDP averages only the model's gradients
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                global_total = means[-1].item()
                running += global_total * len(global_idx)
                term_sums += means[:-1].detach().cpu() * len(global_idx)
                seen += len(global_idx)
                if logger is not None:
                    logger.log(epoch, step, lr, global_total, means[:-1].tolist())
                if on_step is not None and main:
                    on_step(step + 1, total_steps)
            epoch_losses.append(running / max(1, seen))
            if on_epoch is not None and main:
                on_epoch(_epoch_line(epoch, config.epochs, epoch_losses[-1], terms, term_sums / max(1, seen), seen,
                                     time.perf_counter() - epoch_started))
            if main:
                save_checkpoint(
                    checkpoint_path,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "terms": [t.state_dict() for t in terms],
                        "epoch": epoch + 1,
                        "epoch_losses": epoch_losses,
                        "isl_generator": generator.get_state(),
                        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                        **global_rng_state(),
                        **(checkpoint_extra or {}),
                    },
                )
            distributed.barrier()
            if stop_when is not None and stop_when(epoch_losses):
                stopped = epoch + 1
                break
    finally:
        if logger is not None:
            logger.close()
        del loader  # ends persistent workers
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    # data_wait: the share of the steady steps' time spent waiting for a batch.
    return {"epoch_losses": epoch_losses, "steps": total_steps, "data_wait": waited / looped if looped else None,
            "stopped_epoch": stopped if stopped is not None and stopped < config.epochs else None}


def patience_stop(patience: int, min_delta: float = 0.0) -> Callable[[list[float]], bool]:
    """Early stopping on the epoch losses: True once the lowest loss (lower by more than
    `min_delta` than every loss before it) is `patience` epochs old."""
    if patience < 1:
        raise ConfigError(f"patience: must be >= 1, got {patience}")

    def should_stop(losses: list[float]) -> bool:
        best, best_epoch = math.inf, -1
        for epoch, loss in enumerate(losses):
            if loss < best - min_delta:
                best, best_epoch = loss, epoch
        return len(losses) - 1 - best_epoch >= patience

    return should_stop

