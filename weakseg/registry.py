"""One registry pattern for every kind of plug-in (as timm's `register_model`): a decorator
adds a builder under a name, `available(kind)` lists the names, `lookup(kind, name, key)`
returns the builder or one ConfigError naming the config key and the allowed values.

    @register("refiner", "pamr")
    def build_pamr(config): ...

Registrations happen when the module holding them is imported; `KINDS` names, per kind,
the modules that register built-in plug-ins, so `available()` and `lookup()` see them
without the caller importing anything first.
"""

from __future__ import annotations

import importlib
from typing import Callable

from weakseg.errors import ConfigError

# kind -> modules whose import registers the built-in plug-ins of that kind
KINDS: dict[str, tuple[str, ...]] = {
    "method": ("weakseg.models.methods.cam", "weakseg.models.methods.seam", "weakseg.models.methods.vit_cam",
               "weakseg.models.methods.auxsegnet", "weakseg.models.methods.shape_cues"),
    "refiner": ("weakseg.refine.builders",),
    "loss_term": ("weakseg.losses.classification", "weakseg.losses.fsl", "weakseg.losses.deal", "weakseg.losses.seam",
                  "weakseg.losses.region"),
    "backbone": ("weakseg.models.backbones.tiny", "weakseg.models.backbones.efficientnet_lite",
                 "weakseg.models.backbones.resnet38d", "weakseg.models.backbones.timm_models"),
    "dataset": ("weakseg.data.voc", "weakseg.data.folder", "weakseg.data.nyu", "weakseg.data.coco", "weakseg.data.synthetic"),
}
_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated builder (a function or a class) as `name` of `kind`."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown plug-in kind {kind!r}; kinds: {', '.join(_REGISTRY)}")

    def add(builder: Callable) -> Callable:
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not builder:
            raise ValueError(f"{kind} {name!r} is registered twice ({existing.__module__} and {builder.__module__})")
        _REGISTRY[kind][name] = builder
        return builder

    return add


def _load(kind: str) -> dict[str, Callable]:
    for module in KINDS[kind]:
        importlib.import_module(module)
    return _REGISTRY[kind]


def available(kind: str) -> list[str]:
    """The registered names of `kind` (in the order their modules registered them)."""
    return list(_load(kind))


def lookup(kind: str, name: str, key: str) -> Callable:
    """The builder registered as `name`; a ConfigError naming `key` and the allowed values."""
    entries = _load(kind)
    if name not in entries:
        raise ConfigError(f"{key}: {name!r} is not allowed; allowed values: {', '.join(entries)}")
    return entries[name]
