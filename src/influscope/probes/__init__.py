"""Generalisation probes, each side by side with what influence says about the same examples.

Implementations (one per file), registered in :data:`PROBES`:

- ``"id_ood"`` (:func:`~influscope.probes.id_ood.id_ood_probe`): per evaluation set, loss,
  accuracy, distribution shift (domain-classifier AUC, distance to the training domains) and
  whether each example's top influences come from its nearest training domain.
- ``"length"`` (:func:`~influscope.probes.length.length_probe`): accuracy and loss against the
  length of the input, for a model trained up to length L (copy task, facts behind distractors).
- ``"prompting"`` (:func:`~influscope.probes.prompting.prompting_probe`): zero-shot vs k-shot,
  with and without a chain-of-thought style prefix.
- ``"representation"`` (:func:`~influscope.probes.representation.representation_probe`):
  per-layer linear probes (scikit-learn logistic regression) with a permuted-label control,
  next to the layer-wise influence share.

The linear probes need scikit-learn (``pip install 'influscope[probes]'``). Shared helpers live
in :mod:`influscope.probes.base`; the command line is ``influscope probe KIND``
(:mod:`influscope.cli.probe`).
"""

from __future__ import annotations

from collections.abc import Callable

from influscope.errors import lookup
from influscope.probes.base import InfluenceSide, completion_scores, hidden_features, text_scores
from influscope.probes.id_ood import IdOodConfig, IdOodResult, id_ood_probe
from influscope.probes.length import (
    CopyTaskConfig,
    LengthResult,
    copy_records,
    distractor_records,
    length_probe,
    train_copy_model,
)
from influscope.probes.prompting import (
    PromptingConfig,
    PromptingResult,
    build_prompts,
    prompting_probe,
)
from influscope.probes.representation import (
    RepresentationConfig,
    RepresentationResult,
    block_influence_share,
    linear_probe_accuracy,
    representation_probe,
)

#: Probe name → function.
PROBES: dict[str, Callable] = {
    "id_ood": id_ood_probe,
    "length": length_probe,
    "prompting": prompting_probe,
    "representation": representation_probe,
}


def get_probe(name: str) -> Callable:
    """The probe function registered as ``name`` (``"id-ood"`` and ``"id_ood"`` both work).

    Raises:
        RegistryError: Unknown name; the message lists the known ones.
    """
    return lookup(PROBES, name.replace("-", "_"), "probe")


__all__ = [
    "PROBES",
    "CopyTaskConfig",
    "IdOodConfig",
    "IdOodResult",
    "InfluenceSide",
    "LengthResult",
    "PromptingConfig",
    "PromptingResult",
    "RepresentationConfig",
    "RepresentationResult",
    "block_influence_share",
    "build_prompts",
    "completion_scores",
    "copy_records",
    "distractor_records",
    "get_probe",
    "hidden_features",
    "id_ood_probe",
    "length_probe",
    "linear_probe_accuracy",
    "prompting_probe",
    "representation_probe",
    "text_scores",
    "train_copy_model",
]
