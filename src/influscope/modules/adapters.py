"""Module adapters: how a tracked module type maps onto the common (out × in) layout.

Every tracked layer computes ``y = W a + b`` per token. influscope works with the gradient of
the weight in the layout ``(out, in)`` and folds the bias in as a last input column, so that
for the homogeneous input ``ā = [a; 1]`` the per-sequence gradient is

.. math:: \\nabla_{[W\\,b]} L = \\sum_t s_t \\bar a_t^\\top, \\qquad s_t = \\partial L / \\partial y_t.

Implementations:
    * ``LinearAdapter``: ``torch.nn.Linear`` (weight stored ``(out, in)``).
    * ``Conv1DAdapter``: transformers' GPT-2 ``Conv1D`` (weight stored ``(in, out)``).
    * a router adapter for MoE ``*TopKRouter`` gates (their output is a tuple, logits first),
      and :class:`~influscope.modules.experts.ExpertAdapter` for each expert of a fused
      experts module (:mod:`influscope.modules.experts`).

New module types are added with :func:`register_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from influscope.modules.experts import router_adapter


@dataclass(frozen=True)
class ModuleAdapter:
    """How to read a module's shapes and write a gradient back into its parameters.

    Attributes:
        name: Short name of the module kind (``"linear"``, ``"conv1d"``).
        weight_is_out_in: True when ``module.weight`` is stored as ``(out, in)``.
        output_index: When the module returns a tuple, the position of ``y`` in it
            (``None``: the output is ``y``).
    """

    name: str
    weight_is_out_in: bool
    output_index: int | None = None

    @staticmethod
    def weight(module: nn.Module) -> nn.Parameter:
        """The parameter holding ``W``."""
        return module.weight

    def in_features(self, module: nn.Module) -> int:
        """Number of input features ``in`` (without the bias column)."""
        w = module.weight
        return int(w.shape[1] if self.weight_is_out_in else w.shape[0])

    def out_features(self, module: nn.Module) -> int:
        """Number of output features ``out``."""
        w = module.weight
        return int(w.shape[0] if self.weight_is_out_in else w.shape[1])

    @staticmethod
    def has_bias(module: nn.Module) -> bool:
        """Whether the module has a bias (folded in as a last input column)."""
        return getattr(module, "bias", None) is not None

    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        """The combined ``[W b]`` matrix in ``(out, in[+1])`` layout (a copy)."""
        w = module.weight if self.weight_is_out_in else module.weight.t()  # (out, in)
        if self.has_bias(module):
            w = torch.cat([w, module.bias[:, None]], dim=1)  # (out, in + 1)
        return w.detach().clone()

    def split(self, module: nn.Module, g: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Split a ``(out, in[+1])`` matrix into tensors shaped like the module's parameters.

        Args:
            module: The tracked module.
            g: ``(out, in + has_bias)`` matrix in influscope's layout.

        Returns:
            ``[(weight, dW), (bias, db)]`` pairs (bias only when present).
        """
        n_in = self.in_features(module)
        dw = g[:, :n_in]  # (out, in)
        pairs = [(module.weight, dw if self.weight_is_out_in else dw.t())]
        if self.has_bias(module):
            pairs.append((module.bias, g[:, n_in]))
        return pairs

    def join(self, module: nn.Module, grads: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`: parameter-shaped tensors → ``(out, in[+1])``."""
        dw = grads[0] if self.weight_is_out_in else grads[0].t()
        if self.has_bias(module):
            dw = torch.cat([dw, grads[1][:, None]], dim=1)
        return dw


ADAPTERS: dict[type, ModuleAdapter] = {nn.Linear: ModuleAdapter("linear", weight_is_out_in=True)}

try:  # transformers is a core dependency, but keep the import failure local.
    from transformers.pytorch_utils import Conv1D

    ADAPTERS[Conv1D] = ModuleAdapter("conv1d", weight_is_out_in=False)
except ImportError:  # pragma: no cover
    Conv1D = None


def register_adapter(module_type: type, adapter: ModuleAdapter) -> None:
    """Register how to track a new module type (must compute ``y = a W^T + b`` per token)."""
    ADAPTERS[module_type] = adapter


def adapter_for(module: nn.Module) -> ModuleAdapter | None:
    """The adapter for ``module``'s exact type (or an MoE router), or ``None``."""
    return ADAPTERS.get(type(module)) or router_adapter(module)
