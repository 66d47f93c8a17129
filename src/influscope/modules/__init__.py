"""Tracked modules: which layers influence is computed for, and the hooks that read them."""

from influscope.modules.adapters import ADAPTERS, ModuleAdapter, register_adapter
from influscope.modules.capture import Capture, LayerBatch
from influscope.modules.selection import (
    PRESETS,
    FrozenBaseWarning,
    Preset,
    TrackedLayer,
    default_modules,
    select_layers,
)
from influscope.modules.tracked import TrackedModel

__all__ = [
    "ADAPTERS",
    "PRESETS",
    "Capture",
    "FrozenBaseWarning",
    "LayerBatch",
    "ModuleAdapter",
    "Preset",
    "TrackedLayer",
    "TrackedModel",
    "default_modules",
    "register_adapter",
    "select_layers",
]
