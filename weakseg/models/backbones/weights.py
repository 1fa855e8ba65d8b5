"""Weights files: read safely, match strictly, write reproducibly.

:func:`load_weights` reads ``.safetensors`` with safetensors and anything else with
``torch.load(weights_only=True)``; a pickle that would build arbitrary Python objects (and
could run code) is refused with a :class:`~weakseg.errors.DataError` naming the file. Key
matching is strict; with ``allow_head_mismatch=True`` only the ImageNet classifier keys may
differ.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from weakseg.errors import DataError

def checkpoint_module(backbone: nn.Module) -> nn.Module:
    """The module whose state dict a weights file for `backbone` is matched against."""
    return getattr(backbone, "checkpoint_module", backbone)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely (no arbitrary unpickling) and return a flat tensor state dict.

    ``.safetensors`` -> safetensors; anything else -> ``torch.load(weights_only=True)``. A raw
    state dict or a dict holding one under ``state_dict`` or ``model`` is accepted;
    ``module.`` prefixes (DataParallel/DDP) are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "weights file does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise DataError(path, "reading .safetensors needs the safetensors package (pip install safetensors)") from exc
        try:
            data: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise DataError(path, f"not a readable safetensors file: {exc}") from exc
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
            found = re.search(r"Unsupported global: [^.]*(?:\.[A-Za-z_]\w*)*", text) or re.search(
                r"WeightsUnpickler error: [^\n]*", text
            )
            first = found.group(0) if found else type(exc).__name__
            raise DataError(
                path,
                "refused to load: the file pickles Python objects other than tensors and plain containers, "
                f"which could run code when unpickled ({first}). "
                "Use a plain state dict or .safetensors from a trusted source.",
            ) from exc
        except Exception as exc:
            problem = f"cannot read weights with torch.load(weights_only=True): {type(exc).__name__}: {exc}"
            raise DataError(path, problem) from exc

    for _ in range(3):  # unwrap {"state_dict": {...}} / {"model": {...}} (possibly nested)
        if isinstance(data, Mapping) and not all(isinstance(v, torch.Tensor) for v in data.values()):
            inner = next((data[k] for k in ("state_dict", "model") if isinstance(data.get(k), Mapping)), None)
            if inner is None:
                break
            data = inner
    if not isinstance(data, Mapping) or not data:
        raise DataError(path, f"expected a state dict (name -> tensor), got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(
            path, f"not a state dict: {len(bad)} entries are not tensors (e.g. {bad[0]!r}); expected a flat state dict "
            "or a dict with one under 'state_dict' or 'model'"
        )
    state = {}
    for key, value in data.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        state[key] = value
    return state


def _key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_weights(backbone: nn.Module, path: str | Path, *, allow_head_mismatch: bool = False) -> dict[str, list[str]]:
    """Load a local weights file into `backbone` (strict key and shape matching).

    With ``allow_head_mismatch=True`` the backbone's classifier keys (``classifier_prefixes``,
    e.g. ``_fc.`` or timm's ``fc.``/``head.``) may be missing, unexpected or differently
    shaped: they are left at their initial values. Returns the skipped keys per kind.
    """
    target = checkpoint_module(backbone)
    state = read_state_dict(path)
    own = target.state_dict()
    # BatchNorm's step counter carries no weights (it only matters for momentum=None): files
    # from PyTorch code have it, converted ones (ResNet-38d) do not; neither side must fail.
    counter = "num_batches_tracked"
    state = {k: v for k, v in state.items() if not (k.endswith(counter) and k not in own)}
    own = {k: v for k, v in own.items() if not (k.endswith(counter) and k not in state)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    skipped = {"missing": [], "unexpected": [], "mismatched": []}
    if allow_head_mismatch:
        prefixes = tuple(getattr(backbone, "classifier_prefixes", ()))
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
            skipped[kind] = [k for k in keys if prefixes and k.startswith(prefixes)]
            keys[:] = [k for k in keys if k not in skipped[kind]]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_key_list(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_key_list(unexpected)}")
        if mismatched:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
            problems.append(f"{len(mismatched)} shape mismatch(es) (file vs model): {_key_list(shapes)}")
        hint = "" if allow_head_mismatch else "; pass allow_head_mismatch=True if only the classifier head differs"
        raise DataError(path, f"weights do not match {type(backbone).__name__}: " + "; ".join(problems) + hint)
    drop = set(skipped["unexpected"]) | set(skipped["mismatched"])
    target.load_state_dict({k: v for k, v in state.items() if k not in drop}, strict=False)
    return skipped


def save_weights(backbone: nn.Module, path: str | Path) -> Path:
    """Write the backbone's checkpoint state dict: safetensors for ``.safetensors``, else torch.save."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in checkpoint_module(backbone).state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        with open(path, "wb") as handle:  # a handle, not a path: byte-identical files for equal weights
            torch.save(state, handle)
    return path

