"""Selecting the modules to track by name patterns.

Patterns are regular expressions searched in the module's qualified name
(``transformer.h.0.mlp.c_fc``). Presets:

* ``"mlp"`` (default, as Grosse et al. 2023): the MLP / feed-forward projections of GPT-2
  (``mlp.c_fc``, ``mlp.c_proj``), Llama (``mlp.gate_proj/up_proj/down_proj``) and BERT
  (``intermediate.dense``, ``layer.N.output.dense``).
* ``"all"``: every trackable linear layer except the output head (``lm_head``), whose weight
  is usually tied to the input embedding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from influscope.errors import ModuleMatchError
from influscope.modules.adapters import ModuleAdapter, adapter_for

PRESETS: dict[str, tuple[str, ...]] = {
    "mlp": (
        r"\.mlp\.",
        r"\.feed_forward\.",
        r"\.ffn\.",
        r"\.intermediate\.dense$",
        r"\.layer\.\d+\.output\.dense$",
    ),
    "all": (r"^(?!.*lm_head).*$",),
}


@dataclass(frozen=True)
class TrackedLayer:
    """A module whose weight gradient influence is computed for.

    Attributes:
        name: Qualified module name.
        module: The module itself.
        adapter: How its weight maps onto the ``(out, in)`` layout.
        in_dim: Input features, plus one when the bias is folded in.
        out_dim: Output features.
    """

    name: str
    module: nn.Module
    adapter: ModuleAdapter

    @property
    def has_bias(self) -> bool:
        return self.adapter.has_bias(self.module)

    @property
    def in_dim(self) -> int:
        return self.adapter.in_features(self.module) + int(self.has_bias)

    @property
    def out_dim(self) -> int:
        return self.adapter.out_features(self.module)

    @property
    def numel(self) -> int:
        return self.in_dim * self.out_dim


def select_layers(model: nn.Module, modules: str | Sequence[str] = "mlp") -> list[TrackedLayer]:
    """Return the trackable modules of ``model`` whose names match ``modules``.

    Args:
        model: Any ``torch.nn.Module`` (a Hugging Face model, typically).
        modules: A preset name (``"mlp"``, ``"all"``), one regex, or a list of regexes / exact
            module names.

    Returns:
        The matching layers in module order.

    Raises:
        ModuleMatchError: If nothing matches; the message lists the trackable module names.
    """
    if isinstance(modules, str):
        patterns = PRESETS.get(modules, (modules,))
    else:
        patterns = tuple(modules)
    if not patterns:
        raise ModuleMatchError("Expected at least one module pattern, received an empty list.")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ModuleMatchError(f"Module pattern {p!r} is not a valid regex: {exc}.") from None
    trackable = [
        (name, mod, adapter)
        for name, mod in model.named_modules()
        if name and (adapter := adapter_for(mod)) is not None
    ]
    chosen = [
        TrackedLayer(name, mod, adapter)
        for name, mod, adapter in trackable
        if any(name == p or c.search(name) for p, c in zip(patterns, compiled))
    ]
    if not chosen:
        names = [n for n, _, _ in trackable]
        shown = ", ".join(names[:40]) + (" …" if len(names) > 40 else "")
        raise ModuleMatchError(
            f"No trackable module matched {list(patterns)!r}. Trackable modules "
            f"({len(names)}): {shown or 'none (the model has no nn.Linear or Conv1D)'}. "
            "Pass a preset ('mlp', 'all'), a regex, or exact names from this list."
        )
    return chosen
