"""influscope: which training sequences made this language model produce this output?

Influence functions at LLM scale (Grosse et al. 2023) with EK-FAC curvature, per-layer and
per-token attribution, and low-rank query batching.

Sign convention: a positive score means up-weighting the training sequence *increases* the
query's measurement (for causal LMs, ``log p(completion | prompt)``).
"""

from typing import TYPE_CHECKING

from influscope.errors import (
    ConfigError,
    DataError,
    InfluscopeError,
    ModuleMatchError,
    NumericalError,
    StaleArtifactError,
)
from influscope.version import __version__

#: Public names that need torch, and the module each lives in: imported on first use
#: (PEP 562), so that ``influscope --help`` / ``--version`` and ``import influscope.cli`` do not
#: pay for torch and transformers (several seconds) before any work is asked for.
_LAZY = {
    "Influence": "influscope.analyzer",
    "FitConfig": "influscope.config",
    "ScoreConfig": "influscope.config",
    "CURVATURES": "influscope.curvature",
    "CurvatureOperator": "influscope.curvature",
    "TrackedModel": "influscope.modules",
    "select_layers": "influscope.modules",
    "EnsembleScores": "influscope.scoring.ensemble",
    "Scores": "influscope.scoring.pairwise",
    "TASKS": "influscope.tasks",
    "CausalLMTask": "influscope.tasks",
    "ClassificationTask": "influscope.tasks",
    "EncodedDataset": "influscope.tasks",
    "RewardTask": "influscope.tasks",
    "Task": "influscope.tasks",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from influscope.analyzer import Influence
    from influscope.config import FitConfig, ScoreConfig
    from influscope.curvature import CURVATURES, CurvatureOperator
    from influscope.modules import TrackedModel, select_layers
    from influscope.scoring.ensemble import EnsembleScores
    from influscope.scoring.pairwise import Scores
    from influscope.tasks import (
        TASKS,
        CausalLMTask,
        ClassificationTask,
        EncodedDataset,
        RewardTask,
        Task,
    )


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'influscope' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CURVATURES",
    "TASKS",
    "CausalLMTask",
    "ClassificationTask",
    "ConfigError",
    "CurvatureOperator",
    "DataError",
    "EncodedDataset",
    "EnsembleScores",
    "FitConfig",
    "Influence",
    "InfluscopeError",
    "ModuleMatchError",
    "NumericalError",
    "RewardTask",
    "ScoreConfig",
    "Scores",
    "StaleArtifactError",
    "Task",
    "TrackedModel",
    "__version__",
    "select_layers",
]
