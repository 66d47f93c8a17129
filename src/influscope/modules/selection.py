"""Selecting the modules to track by name patterns.

Patterns are regular expressions searched in the module's qualified name
(``transformer.h.0.mlp.c_fc``). Presets:

* ``"mlp"`` (default, as Grosse et al. 2023): the MLP / feed-forward projections of GPT-2
  (``mlp.c_fc``, ``mlp.c_proj``), Llama (``mlp.gate_proj/up_proj/down_proj``) and BERT
  (``intermediate.dense``, ``layer.N.output.dense``).
* ``"attn"``: the attention projections that ``ScoreConfig(per_head=True)`` splits by head:
  GPT-2 ``attn.c_attn`` / ``attn.c_proj`` and Llama-style ``self_attn.{q,k,v,o}_proj``
  (:mod:`influscope.modules.heads`).
* MoE models (transformers 5.x fused experts): each expert's ``gate_up_proj`` / ``down_proj``
  slice is trackable as ``<block>.experts.<param>.<e>`` and the router as ``<block>.gate``, so
  ``"mlp"`` tracks every expert and the router (:mod:`influscope.modules.experts`).
* ``"all"``: every trackable linear layer except the output head (``lm_head``), whose weight
  is usually tied to the input embedding.
* ``"lora"``: the LoRA adapter matrices of a PEFT model (``….lora_A.default``,
  ``….lora_B.default``; Hu et al. 2022), i.e. the parameters a LoRA fine-tune trained. Each is
  an ``nn.Linear`` (``A: in → r``, ``B: r → out``), so K-FAC/EK-FAC apply unchanged: the
  Kronecker factors of ``A`` are ``E[x xᵀ]`` (``in × in``) and ``E[s_A s_Aᵀ]`` (``r × r``).
* ``"trainable"``: like ``"all"``, restricted to modules whose weight has
  ``requires_grad=True`` (partial fine-tunes, frozen encoders).

When the selection contains the frozen ``base_layer`` of a LoRA-wrapped module, a
:class:`FrozenBaseWarning` says so: influence through those weights is well defined (it asks
"what if the base weights had been trained too"), but it is not the question the fine-tune
poses. (It can still rank the fine-tuning data well: docs/lora.md has the measurements.)
:func:`default_modules` picks ``"lora"`` for models with adapters, ``"mlp"`` otherwise.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from influscope.errors import ModuleMatchError
from influscope.modules.adapters import ModuleAdapter, adapter_for
from influscope.modules.expert_lists import list_expert_adapter
from influscope.modules.experts import ExpertAdapter, check_experts, expert_layers

#: A PEFT LoRA adapter matrix: ``….lora_A.<adapter name>`` or ``….lora_B.<adapter name>``.
LORA_PATTERN = r"\.lora_[AB]\.[^.]+$"


@dataclass(frozen=True)
class Preset:
    """A named module selection.

    Attributes:
        patterns: Regexes searched in qualified module names; a module matching any is kept.
        trainable_only: Keep only modules whose weight has ``requires_grad=True``.
    """

    patterns: tuple[str, ...]
    trainable_only: bool = False


#: Registry of ``modules=`` presets (add entries to extend).
PRESETS: dict[str, Preset] = {
    "mlp": Preset(
        (
            r"\.mlp\.",
            r"\.feed_forward\.",
            r"\.ffn\.",
            r"\.intermediate\.dense$",
            r"\.layer\.\d+\.output\.dense$",
        )
    ),
    "attn": Preset((r"\.attn\.c_(attn|proj)$", r"\.(self_attn|attention)\.[qkvo]_proj$")),
    "all": Preset((r"^(?!.*lm_head).*$",)),
    "lora": Preset((LORA_PATTERN,)),
    "trainable": Preset((r"^(?!.*lm_head).*$",), trainable_only=True),
}


class FrozenBaseWarning(UserWarning):
    """The tracked modules include frozen base weights of LoRA-wrapped layers."""


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds PEFT LoRA adapter matrices (``….lora_A.<name>``)."""
    pattern = re.compile(LORA_PATTERN)
    return any(pattern.search(name) for name, _ in model.named_modules())


def default_modules(model: nn.Module) -> str:
    """The preset to track when none is given: ``"lora"`` for a LoRA model, else ``"mlp"``."""
    return "lora" if has_lora(model) else "mlp"


@dataclass(frozen=True)
class TrackedLayer:
    """A module whose weight gradient influence is computed for.

    Attributes:
        name: Qualified module name.
        module: The module itself.
        adapter: How its weight maps onto the ``(out, in)`` layout (for an MoE expert, the
            slice ``param[e]`` of the experts module, :mod:`influscope.modules.experts`).
        in_dim: Input features, plus one when the bias is folded in.
        out_dim: Output features.
    """

    name: str
    module: nn.Module
    adapter: ModuleAdapter | ExpertAdapter

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
        modules: A preset name (``"mlp"``, ``"all"``, ``"lora"``, ``"trainable"``), one regex,
            or a list of regexes / exact module names.

    Returns:
        The matching layers in module order.

    Raises:
        ModuleMatchError: If nothing matches; the message lists the trackable module names.

    Warns:
        FrozenBaseWarning: If a selected module is the frozen ``base_layer`` of a LoRA layer.
    """
    if isinstance(modules, str):
        preset = PRESETS.get(modules, Preset((modules,)))
    else:
        preset = Preset(tuple(modules))
    patterns = preset.patterns
    if not patterns:
        raise ModuleMatchError("Expected at least one module pattern, received an empty list.")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise ModuleMatchError(f"Module pattern {p!r} is not a valid regex: {exc}.") from None

    def wanted(name: str) -> bool:
        return any(name == p or c.search(name) for p, c in zip(patterns, compiled))

    trackable = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if (adapter := adapter_for(mod)) is not None:
            adapter = list_expert_adapter(name, mod, model) or adapter  # ModuleList MoE experts
            trackable.append((name, mod, adapter))
        trackable.extend((sub, mod, ad) for sub, ad in expert_layers(name, mod))  # MoE experts
    check_experts(
        [
            (n, m)
            for n, m in model.named_modules()
            if n and wanted(n) and list_expert_adapter(n, m, model) is None
        ]
    )
    chosen = [
        TrackedLayer(name, mod, adapter)
        for name, mod, adapter in trackable
        if wanted(name) and (not preset.trainable_only or adapter.weight(mod).requires_grad)
    ]
    if not chosen:
        names = [n for n, _, _ in trackable]
        shown = ", ".join(names[:40]) + (" …" if len(names) > 40 else "")
        which = "trainable module (requires_grad=True)" if preset.trainable_only else "module"
        raise ModuleMatchError(
            f"No trackable {which} matched {list(patterns)!r}. Trackable modules "
            f"({len(names)}): {shown or 'none (the model has no nn.Linear or Conv1D)'}. "
            f"Pass a preset ({', '.join(map(repr, PRESETS))}), a regex, or exact names from "
            "this list."
        )
    frozen_base = [t.name for t in chosen if t.name.endswith(".base_layer")]
    if frozen_base and has_lora(model):
        warnings.warn(
            f"{len(frozen_base)} tracked modules are frozen base layers of LoRA adapters "
            f"(e.g. {frozen_base[0]!r}): their influence asks what training the base weights "
            "would have done, not what the adapter training did. To attribute through the "
            "adapter weights the fine-tune trained, pass modules='lora'; docs/lora.md compares "
            "the two on measured fine-tunes.",
            FrozenBaseWarning,
            stacklevel=2,
        )
    return chosen
