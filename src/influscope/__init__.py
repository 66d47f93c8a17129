"""influscope: which training sequences made this language model produce this output?

Influence functions at LLM scale (Grosse et al. 2023) with EK-FAC curvature, per-layer and
per-token attribution, and low-rank query batching.

Sign convention: a positive score means up-weighting the training sequence *increases* the
query's measurement (for causal LMs, ``log p(completion | prompt)``).
"""

from influscope.analyzer import Influence
from influscope.config import FitConfig, ScoreConfig
from influscope.curvature import CURVATURES, CurvatureOperator
from influscope.errors import (
    ConfigError,
    DataError,
    InfluscopeError,
    ModuleMatchError,
    NumericalError,
    StaleArtifactError,
)
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
from influscope.version import __version__

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
