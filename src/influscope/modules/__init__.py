"""Tracked modules: which layers influence is computed for, and the hooks that read them."""

from influscope.modules.adapters import ADAPTERS, ModuleAdapter, register_adapter
from influscope.modules.capture import Capture, LayerBatch
from influscope.modules.selection import PRESETS, TrackedLayer, select_layers

__all__ = [
    "ADAPTERS",
    "PRESETS",
    "Capture",
    "LayerBatch",
    "ModuleAdapter",
    "TrackedLayer",
    "register_adapter",
    "select_layers",
]
