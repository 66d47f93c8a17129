"""What every stage runs on: a model, its task and the tracked layers (:class:`TrackedModel`).

The stage functions (fit, precondition, score, self-influence, token scores, damping sweep,
index build and query, unlearning's forget gradients) take one ``TrackedModel`` instead of a
``(model, task, layers)`` triple; :class:`influscope.Influence` holds one as ``inf.tracked``,
and applications pass it on instead of reaching into the facade's attributes. The primitives
below the stages (:func:`~influscope.modules.passes.layer_passes`, the Gauss-Newton products)
still take the parts.

(The issue that asked for it calls it a "probe object"; ``influscope.probes`` is already the
generalization-probe package, hence the name.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from influscope.errors import ConfigError
from influscope.modules.selection import TrackedLayer, default_modules, select_layers
from influscope.storage.fingerprint import model_fingerprint
from influscope.tasks import Task, get_task

__all__ = ["TrackedModel"]


@dataclass(frozen=True)
class TrackedModel:
    """A model, the task that defines its loss and measurement, and the layers tracked.

    Attributes:
        model: A PyTorch / Hugging Face model (on the device every stage runs on).
        task: The :class:`~influscope.tasks.Task`.
        layers: The tracked layers (:func:`~influscope.modules.select_layers`), in order.
    """

    model: nn.Module
    task: Task
    layers: tuple[TrackedLayer, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.task, Task):
            raise ConfigError(
                f"TrackedModel needs a Task instance; received {type(self.task).__name__}. "
                "Use TrackedModel.select(model, 'causal_lm', ...) to look a task up by name."
            )
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ConfigError(
                "TrackedModel needs at least one tracked layer; received none. Select them "
                "with modules= (a preset such as 'mlp', a regex, or a list of names)."
            )

    @classmethod
    def select(
        cls, model: nn.Module, task: str | Task, modules: str | Sequence[str] | None = None
    ) -> TrackedModel:
        """Look the task up by name and select the tracked layers (``modules=None``: the
        model's default, :func:`~influscope.modules.default_modules`)."""
        modules = default_modules(model) if modules is None else modules
        return cls(model, get_task(task), tuple(select_layers(model, modules)))

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def fingerprint(self) -> str:
        """Fingerprint of the model's architecture and tracked weights."""
        return model_fingerprint(self.model, list(self.layers))
