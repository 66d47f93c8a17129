"""Ground truth for influence scores: how far can they be trusted?

Influence functions on large models are contested (Li et al. 2024, "Do Influence Functions
Work on Large Language Models?"), so influscope measures its estimators against counterfactual
retraining and exact references:

* :mod:`.retrain` — :class:`RetrainingHarness`: a recipe ``(indices, seed) → model`` run on
  subsets in parallel processes, every result stored atomically so evaluations resume;
* :mod:`.counterfactual` — :func:`leave_one_out`, :func:`lds` (linear datamodeling score),
  :func:`brittleness` (remove top proponents vs. random);
* :mod:`.bank` — the validation bank of a user's own fine-tune: :func:`build_bank` (leave-k%-out
  counterfactual fine-tunes, resumable, refused when stale or nondeterministic);
  :mod:`.bank_score` — :func:`score_bank` (LDS per drop fraction, top-k removal test);
  :mod:`.bank_recipe` — the built-in fine-tune or your function as a bank recipe;
  :mod:`.bank_report` — terminal lines and the HTML report's section;
* :mod:`.pbrf` — :func:`pbrf_influence`, the proximal Bregman response function (what
  influence functions estimate for a network that is not at an optimum);
* :mod:`.mislabel` — :func:`flip_labels`, :func:`detection_report` (ROC-AUC, found@p);
* :mod:`.baselines` — gradient dot / cosine, TracIn, representation similarity, BM25;
* Pearson, Spearman, LDS, ROC-AUC, found@p are :mod:`influscope.metrics` (the library's bottom
  layer, shared with scoring and analysis), re-exported here.

The toy problem of the CI floors is :mod:`influscope.toy`; the MiniLM sentiment classifier of the
mislabel benchmark is ``benchmarks.sentiment``.

The measured figures live in ``docs/accuracy.md``; ``make bench-accuracy`` reproduces them.
"""

from influscope.evaluation.bank import (
    Bank,
    BankConfig,
    bank_fingerprints,
    build_bank,
    drop_sets,
    load_bank,
)
from influscope.evaluation.bank_recipe import BankRecipe, callable_recipe, finetune_recipe
from influscope.evaluation.bank_score import BankScore, ScoreBankConfig, score_bank
from influscope.evaluation.baselines import (
    bm25,
    gradient_cosine,
    gradient_dot,
    hidden_states,
    representation_similarity,
    tracin,
)
from influscope.evaluation.config import BrittlenessConfig, LDSConfig, MislabelConfig, PBRFConfig
from influscope.evaluation.counterfactual import (
    BrittlenessResult,
    LDSResult,
    LOOResult,
    brittleness,
    lds,
    lds_subsets,
    leave_one_out,
)
from influscope.evaluation.mislabel import MislabelReport, detection_report, flip_labels
from influscope.evaluation.pbrf import PBRFResult, pbrf_influence
from influscope.evaluation.retrain import Job, RetrainingHarness, default_workers
from influscope.metrics import found_at, lds_score, pearson, roc_auc, spearman

__all__ = [
    "Bank",
    "BankConfig",
    "BankRecipe",
    "BankScore",
    "BrittlenessConfig",
    "BrittlenessResult",
    "Job",
    "LDSConfig",
    "LDSResult",
    "LOOResult",
    "MislabelConfig",
    "MislabelReport",
    "PBRFConfig",
    "PBRFResult",
    "RetrainingHarness",
    "ScoreBankConfig",
    "bank_fingerprints",
    "bm25",
    "brittleness",
    "build_bank",
    "callable_recipe",
    "default_workers",
    "detection_report",
    "drop_sets",
    "finetune_recipe",
    "flip_labels",
    "found_at",
    "gradient_cosine",
    "gradient_dot",
    "hidden_states",
    "lds",
    "lds_score",
    "lds_subsets",
    "leave_one_out",
    "load_bank",
    "pbrf_influence",
    "pearson",
    "representation_similarity",
    "roc_auc",
    "score_bank",
    "spearman",
    "tracin",
]
