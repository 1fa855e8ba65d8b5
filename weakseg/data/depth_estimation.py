"""Depth maps from a depth-estimation model, for datasets without depth (VOC, COCO, own photos).

DEAL needs a depth map per training image. When a dataset has none, a monocular estimator
can stand in: `estimate_depth_folder` runs a model on every image of a dataset and writes
`OUT/<id>.npy`, a folder that a `folder` dataset config then reads with
`depth_dir: OUT` and `depth_scale: 1.0` (command line: `weakseg data depth`).

Models (`load_depth_model`), tried in this order:

* an existing **file**: a TorchScript module (`torch.jit.save`, usually `.pt`/`.ts`);
* an existing **folder**: a local Hugging Face model, run through a `transformers`
  `pipeline("depth-estimation", model=folder)` (needs `pip install transformers`);
* a **Python spec** `module:callable` (or `path/to/file.py:callable`): the callable is
  called without arguments and returns a `torch.nn.Module` (an attribute that already is
  a module is used as it is), so any torch model defined in user code works.

A torch module (TorchScript or spec) receives a (1, 3, H, W) float32 RGB tensor in [0, 1]
at the image's own size, optionally normalised per channel with `mean`/`std`, and returns
a (1, 1, h, w) or (1, h, w) map. A model that needs a fixed input size or a multiple of
a patch size does that resizing inside its `forward`. Every prediction is resized back to
the image size bilinearly (`align_corners=False`).

Orientation. `Sample.depth` means larger = farther. `output="depth"` stores the resized
prediction as it is. `output="disparity"` is for models that predict inverse depth
(larger = nearer; e.g. DPT and the relative Depth Anything models): after resizing, each
map d becomes `max(d) / max(d, DISPARITY_FLOOR * max(d))`, a relative depth equal to 1 at
the nearest point and capped at 1 / DISPARITY_FLOOR (100) where the disparity is near 0 or
negative (sky, invalid pixels). Relative disparities from such models are only known up
to scale and shift, so this is an ordering-preserving approximation, not metric depth.

Scale. Monocular estimates are relative, not metres. DEAL only uses depth *edges*, each
edge map divided by its own maximum, so a global scale of the depth map does not change
the loss; the orientation does (depth and disparity weight near and far edges
differently), which is why `output` must match the model. Other consumers that read
`Sample.depth` as metres get relative values from such a folder.

Cache. `OUT/manifest.json` records the model (path or spec, a content hash, its kind), the
output kind, the normalisation and the conversion. A later run with the same model and
settings skips every id whose `.npy` exists and is valid (loadable float32, finite, of the
image's size), so an interrupted run resumes. A folder made by another model or settings,
or `.npy` files without a manifest, is refused unless `overwrite=True`, which recomputes
every map of the dataset. A model file is code: load only models you trust.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from weakseg.data.io import atomic_path, resolve_under, write_text_atomic
from weakseg.errors import ConfigError, DataError

OUTPUTS = ("depth", "disparity")
DISPARITY_FLOOR = 0.01  # disparities below this fraction of the map's maximum are clamped
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Manifest keys that must match for cached maps to be reused (the model path may move).
REUSE_KEYS = ("format", "model_hash", "output", "conversion", "mean", "std")
SCALE_NOTE = (
    "model units, larger = farther: relative depth for most monocular estimators, not metres. "
    "Read it with depth_scale: 1.0. DEAL normalises each depth edge map by its own maximum, so "
    "the scale does not matter, only the orientation."
)
_SPEC = re.compile(r"^(?P<module>[^:]+):(?P<attr>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)$")


# ----------------------------------------------------------------------------- models


@dataclass
class DepthModel:
    """A loaded depth estimator: `predict(image)` -> (H, W) float32 depth, larger = farther.

    source:       the file or folder (absolute) or the `module:callable` spec.
    kind:         "torchscript", "transformers" or "python".
    content_hash: "sha256:..." of the model file, of the folder's files, or, for a spec, of
                  the callable's source file and the module's parameters and buffers.
    """

    source: str
    kind: str
    content_hash: str
    output: str
    forward: Callable[[np.ndarray], torch.Tensor]  # uint8 (H, W, 3) -> raw (h, w) float32 map
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "cpu"

    @property
    def conversion(self) -> str:
        if self.output == "disparity":
            return f"depth = max(d) / max(d, {DISPARITY_FLOOR:g} * max(d)) per image, after resizing"
        return "none: the resized prediction is the depth"

    def manifest(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "written_by": "weakseg data depth",
            "model": self.source,
            "model_kind": self.kind,
            "model_hash": self.content_hash,
            "output": self.output,
            "conversion": self.conversion,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "scale": SCALE_NOTE,
        }

    def predict_raw(self, image: np.ndarray) -> np.ndarray:
        """The model's own map (depth or disparity), resized to the image: (H, W) float32."""
        height, width = image.shape[:2]
        raw = self.forward(image).detach().to("cpu", torch.float32)
        if tuple(raw.shape) != (height, width):
            raw = F.interpolate(raw[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        values = raw.numpy().astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise ValueError("the prediction has non-finite values")
        return values

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float32 relative depth, larger = farther (see the module docstring)."""
        raw = self.predict_raw(image)
        return disparity_to_depth(raw) if self.output == "disparity" else raw


def disparity_to_depth(disparity: np.ndarray, floor: float = DISPARITY_FLOOR) -> np.ndarray:
    """Relative depth from a disparity (inverse-depth) map: max(d) / max(d, floor * max(d)).

    1 at the largest disparity (nearest), 1 / floor where the disparity is at most
    floor * max(d) (far, sky, invalid). Strictly decreasing in d above the floor.
    """
    top = float(np.max(disparity))
    if not top > 0:
        raise ValueError(f"a disparity map needs a positive maximum to be oriented, got max {top:g}")
    clamped = np.maximum(disparity, np.float32(floor * top))
    return (np.float32(top) / clamped).astype(np.float32)


def load_depth_model(
    path_or_spec: str | Path,
    device: str | torch.device = "cpu",
    output: str = "depth",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DepthModel:
    """Load a TorchScript file, a local Hugging Face model folder or a `module:callable` spec.

    output: "depth" when the model predicts depth (larger = farther), "disparity" when it
            predicts inverse depth (larger = nearer); disparity is converted per image.
    mean/std: per-channel normalisation of the [0, 1] RGB input of torch modules (both or
            neither; 3 values each). A Hugging Face pipeline normalises with its own
            image processor and takes neither.
    """
    if output not in OUTPUTS:
        raise ConfigError(f"output: {output!r} is not allowed; allowed values: {', '.join(OUTPUTS)}")
    norm = _normalisation(mean, std)
    device = str(device)
    text = str(path_or_spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if norm is not None:
            raise ConfigError(
                "mean/std: a Hugging Face pipeline normalises images with its own image processor; leave them unset"
            )
        forward, digest = _load_pipeline(path, device)
        return DepthModel(str(path.resolve()), "transformers", digest, output, forward, device=device)
    if path.is_file():
        if path.suffix.lower() == ".py":
            raise ConfigError(f"model: {text} is a Python file; give `{text}:callable`, a function returning the module")
        module = _load_torchscript(path, device)
        digest = _hash_file(path)
        source, kind = str(path.resolve()), "torchscript"
    elif _SPEC.match(text):
        module = _load_spec(text, device)
        digest = _hash_spec_module(text, module)
        source, kind = text, "python"
    else:
        raise DataError(
            path,
            "model does not exist: give a TorchScript file (.pt/.ts), a local Hugging Face model "
            "folder, or a Python spec module:callable",
        )
    module.eval()
    forward = _torch_forward(module, device, norm, source)
    mean_t, std_t = (tuple(norm[0]), tuple(norm[1])) if norm is not None else (None, None)
    return DepthModel(source, kind, digest, output, forward, mean_t, std_t, device)


def _normalisation(mean, std) -> tuple[list[float], list[float]] | None:
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ConfigError("mean/std: give both or neither")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"mean/std: need 3 values each (R, G, B), got {len(mean)} and {len(std)}")
    if not all(math.isfinite(v) for v in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise ConfigError(f"mean/std: mean must be finite and std positive, got {mean} and {std}")
    return mean, std


def _torch_forward(module: torch.nn.Module, device: str, norm, source: str) -> Callable[[np.ndarray], torch.Tensor]:
    shift = scale = None
    if norm is not None:
        shift = torch.tensor(norm[0], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        scale = torch.tensor(norm[1], dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def forward(image: np.ndarray) -> torch.Tensor:
        x = torch.tensor(np.asarray(image, dtype=np.uint8), device=device).permute(2, 0, 1)[None].float() / 255.0
        if shift is not None:
            x = (x - shift) / scale
        with torch.no_grad():
            y = module(x)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"the module returned {type(y).__name__}, expected a tensor")
        if y.dim() == 4 and y.shape[:2] == (1, 1):
            return y[0, 0]
        if y.dim() == 3 and y.shape[0] == 1:
            return y[0]
        raise ValueError(f"the module returned shape {tuple(y.shape)}, expected (1, 1, h, w) or (1, h, w)")

    return forward


def _load_torchscript(path: Path, device: str) -> torch.nn.Module:
    try:
        return torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError, ValueError or its own reader errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            path,
            f"not a loadable TorchScript file ({first}); save a model with "
            "torch.jit.save(torch.jit.script(model), path), or give a Python spec module:callable",
        ) from None


def _load_pipeline(folder: Path, device: str):
    if not (folder / "config.json").is_file():
        raise DataError(folder, "not a Hugging Face model folder (no config.json)")
    try:
        from transformers import pipeline
    except ImportError:
        raise DataError(
            folder,
            "a Hugging Face model folder is run with the transformers package, which is not "
            "installed: pip install transformers",
        ) from None
    digest = _hash_folder(folder)
    try:
        pipe = pipeline("depth-estimation", model=str(folder), device=device)
    except Exception as exc:  # transformers raises many kinds for a folder it cannot use
        raise DataError(folder, f"cannot build a depth-estimation pipeline ({type(exc).__name__}: {exc})") from None

    from PIL import Image

    def forward(image: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            result = pipe(Image.fromarray(np.asarray(image, dtype=np.uint8), mode="RGB"))
        if isinstance(result, list):
            result = result[0]
        predicted = torch.as_tensor(result["predicted_depth"]).float()
        while predicted.dim() > 2 and predicted.shape[0] == 1:
            predicted = predicted[0]
        if predicted.dim() != 2:
            raise ValueError(f"the pipeline returned predicted_depth of shape {tuple(predicted.shape)}")
        return predicted

    return forward, digest


def _load_spec(spec: str, device: str) -> torch.nn.Module:
    match = _SPEC.match(spec)
    module_name, attr = match.group("module"), match.group("attr")
    target = _import_spec_module(module_name, spec)
    obj: Any = target
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model: {spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        module = obj
    elif callable(obj):
        module = obj()
    else:
        raise ConfigError(f"model: {spec}: {attr} is neither a callable nor a torch module")
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"model: {spec}: returned {type(module).__name__}, expected a torch.nn.Module")
    return module.to(device)


def _import_spec_module(name: str, spec: str):
    if name.endswith(".py"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(path, f"Python file of model spec {spec!r} does not exist")
        unique = "_weakseg_depth_model_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        loader_spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[unique] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(unique, None)
            raise
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Console scripts do not put the working folder on sys.path; user code usually lives there.
        if exc.name != name.split(".")[0] or os.getcwd() in sys.path:
            raise ConfigError(f"model: {spec}: cannot import {name} ({exc})") from None
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"model: {spec}: cannot import {name} ({exc})") from None
    finally:
        sys.path.remove(os.getcwd())


# ----------------------------------------------------------------------------- hashes


def _update_with_file(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def _hash_file(path: Path) -> str:
    """The file's content only: a renamed or moved model keeps its cache."""
    digest = hashlib.sha256()
    _update_with_file(digest, path)
    return "sha256:" + digest.hexdigest()


def _hash_folder(folder: Path) -> str:
    """Every non-hidden file under the folder (names and contents), in a fixed order."""
    files = []
    for current, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(current) / n for n in sorted(names) if not n.startswith(".")]
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(str(path.stat().st_size).encode() + b"\0")
        _update_with_file(digest, path)
    return "sha256:" + digest.hexdigest()


def _hash_spec_module(spec: str, module: torch.nn.Module) -> str:
    """The callable's source file plus the module's class and every parameter and buffer:
    new weights or edited code give a new hash; the spec's name does not enter it."""
    digest = hashlib.sha256()
    module_name = _SPEC.match(spec).group("module")
    source = None
    if module_name.endswith(".py"):
        source = Path(module_name).expanduser()
    else:
        loaded = sys.modules.get(module_name)
        source = Path(loaded.__file__) if getattr(loaded, "__file__", None) else None
    if source is not None and source.is_file():
        digest.update(source.read_bytes())
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}\0".encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        try:
            digest.update(data.view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):  # quantized or other exotic tensors
            digest.update(repr(data.tolist()).encode())
    return "sha256:" + digest.hexdigest()


# ----------------------------------------------------------------------------- the folder


@dataclass
class DepthFolderResult:
    """What `estimate_depth_folder` did. `unlisted`: .npy files in the folder that are not
    ids of this dataset (left untouched; they may come from an earlier model)."""

    out_dir: Path
    manifest: Path
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    unlisted: list[Path] = field(default_factory=list)


def depth_map_path(out_dir: str | Path, sample_id: str) -> Path:
    """`out_dir/<id>.npy`; ids may contain `/`, but never escape `out_dir`."""
    return resolve_under(out_dir, f"{sample_id}.npy", "id")


def estimate_depth_folder(
    dataset,
    model: DepthModel,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DepthFolderResult:
    """Write `out_dir/<id>.npy` (float32 (H, W), larger = farther) for every sample.

    Runs the model without gradients in eval mode and resizes each prediction to its
    image bilinearly; each file is written atomically. Valid maps already in the folder
    from the same model and settings are kept (the cache). Raises DataError naming the
    folder when it holds maps of another model, or .npy files without a manifest, unless
    `overwrite=True`, which recomputes every map of the dataset.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "output folder is a file")
    targets = [depth_map_path(out_dir, sample_id) for sample_id in dataset.ids]  # refuse escaping ids first
    manifest_path = out_dir / MANIFEST
    wanted = model.manifest()
    if not overwrite:
        _check_reusable(out_dir, manifest_path, wanted)
    else:
        for target in targets:  # a run interrupted after this never leaves old maps under the new manifest
            if target.is_file():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(manifest_path, json.dumps(wanted, indent=2) + "\n")

    result = DepthFolderResult(out_dir=out_dir, manifest=manifest_path)
    total = len(dataset.ids)
    for index, target in enumerate(targets):
        sample = dataset.load(index)
        shape = tuple(sample.image.shape[:2])
        if _valid_map(target, shape):
            result.reused.append(sample.id)
        else:
            try:
                depth = model.predict(sample.image)
            except (RuntimeError, ValueError) as exc:
                raise DataError(model.source, f"depth estimation failed on image {sample.id!r}: {exc}") from None
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, np.ascontiguousarray(depth, dtype=np.float32), allow_pickle=False)
            result.written.append(sample.id)
        if progress is not None:
            progress(index + 1, total)
    listed = {t.resolve() for t in targets}
    result.unlisted = sorted(p for p in out_dir.rglob("*.npy") if not p.name.startswith(".") and p.resolve() not in listed)
    return result


def _check_reusable(out_dir: Path, manifest_path: Path, wanted: dict[str, Any]) -> None:
    hint = "pass overwrite=True (--overwrite) to recompute every map, or choose another output folder"
    if not manifest_path.is_file():
        if out_dir.is_dir() and any(p for p in out_dir.rglob("*.npy") if not p.name.startswith(".")):
            raise DataError(out_dir, f"holds .npy files but no {MANIFEST}, so the model that made them is unknown; {hint}")
        return
    try:
        found = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(found, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise DataError(manifest_path, f"unreadable depth cache manifest ({exc}); {hint}") from None
    differences = [
        f"{key} {found.get(key)!r} (now {wanted[key]!r})" for key in REUSE_KEYS if found.get(key) != wanted[key]
    ]
    if differences:
        raise DataError(
            out_dir,
            f"depth maps here were made by a different model or settings (model {found.get('model')!r}; "
            f"{'; '.join(differences)}); {hint}",
        )


def _valid_map(path: Path, shape: tuple[int, int]) -> bool:
    if not path.is_file():
        return False
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return (
        isinstance(values, np.ndarray)
        and values.dtype == np.float32
        and values.shape == shape
        and bool(np.isfinite(values).all())
    )


__all__ = [
    "DISPARITY_FLOOR",
    "DepthFolderResult",
    "DepthModel",
    "OUTPUTS",
    "depth_map_path",
    "disparity_to_depth",
    "estimate_depth_folder",
    "load_depth_model",
]
