"""Import glue for torchvision and timm on a CPU-only torch.

Why this exists
---------------
The lock pins ``torch==2.13.0`` (resolved to the ``+cpu`` wheel here) together with
``torchvision==0.28.0``, and torchvision 0.28.0 is published on PyPI only as a CUDA build. Its
compiled extension (``torchvision/_C.so``) then cannot be loaded next to a CPU torch, and
``import torchvision`` dies with ``RuntimeError: operator torchvision::nms does not exist``:
torchvision registers "fake" (shape-only) kernels for the ``nms``/``qnms`` operators with
``torch.library.register_fake``, which requires the operator schema to be defined, and the
schema normally comes from the extension that failed to load. timm imports torchvision, so
timm fails the same way.

When it applies
---------------
Only when the compiled extension cannot be loaded. :func:`ensure_torchvision` first checks
whether ``torch.ops.torchvision.nms`` exists and otherwise tries to load torchvision's own
extension library exactly as torchvision would. If that works (a matching CUDA or CPU build,
e.g. on a GPU box) nothing is patched. Only if it fails are the two schemas defined, so that
the ``register_fake`` calls succeed. Nothing here provides an ``nms`` *implementation*: calling
``torchvision.ops.nms`` still raises torchvision's own "Couldn't load custom C++ ops" error.
weakseg uses none of the compiled ops (timm backbones only need plain torch layers).

Everything in weakseg that needs torchvision or timm goes through :func:`import_timm` or
:func:`ensure_torchvision`; never import them directly.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

from weakseg.errors import WeaksegError

# The operator schemas that torchvision's Python code needs to exist at import time.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# Kept at module level on purpose: a torch.library.Library removes its definitions when it is
# garbage collected.
_SCHEMA_LIBRARY: torch.library.Library | None = None


def _torchvision_ops_present() -> bool:
    return all(hasattr(torch.ops.torchvision, op) for op in _SCHEMAS)


def _try_load_extension() -> bool:
    """Load torchvision's compiled ops the way torchvision itself does; False if it cannot."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for directory in spec.submodule_search_locations:
        for path in sorted(glob.glob(os.path.join(directory, "_C*.so")) + glob.glob(os.path.join(directory, "_C*.pyd"))):
            try:
                torch.ops.load_library(path)
            except (OSError, RuntimeError):
                continue
            if _torchvision_ops_present():
                return True
    return False


def compiled_ops_shimmed() -> bool:
    """True if this process had to define placeholder schemas (torchvision's ops unavailable)."""
    return _SCHEMA_LIBRARY is not None


def ensure_torchvision() -> ModuleType:
    """Import and return torchvision, defining the missing op schemas first if needed."""
    global _SCHEMA_LIBRARY
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        raise WeaksegError("torchvision is not installed; `pip install -r requirements.lock` (torchvision==0.28.0)")
    if not _torchvision_ops_present() and not _try_load_extension():
        library = torch.library.Library("torchvision", "DEF")
        for op, schema in _SCHEMAS.items():
            if not hasattr(torch.ops.torchvision, op):
                library.define(schema)
        _SCHEMA_LIBRARY = library
    return importlib.import_module("torchvision")


def import_timm() -> ModuleType:
    """Import and return timm (after :func:`ensure_torchvision`), with a clear error if missing."""
    if importlib.util.find_spec("timm") is None:
        raise WeaksegError("timm is not installed; `pip install -r requirements.lock` (it pins timm)")
    ensure_torchvision()
    return importlib.import_module("timm")
