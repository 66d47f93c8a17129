"""Studies of generalization (Grosse et al. 2023, §5): what influence scores say about a model.

One study per module; each takes plain inputs (a ``(Q, N)`` score matrix, per-layer terms,
records, texts) and returns a frozen result with ``to_dict()`` (JSON) and ``to_section()`` (a
report :class:`~influscope.report.views.Section`):

- :mod:`~influscope.analysis.sparsity` — power-law tail fit (exponent, ``x_min``, bootstrap
  goodness-of-fit p-value, lognormal / exponential comparisons) and the top-1 % share.
- :mod:`~influscope.analysis.overlap` — influence vs. BM25 / TF-IDF similarity to the query.
- :mod:`~influscope.analysis.layers` — per-layer shares, lower/middle/upper thirds, heatmaps.
- :mod:`~influscope.analysis.languages` — cross-lingual influence ratios.
- :mod:`~influscope.analysis.word_order` — same vs. reversed order ratios.
- :mod:`~influscope.analysis.tokens` — per-token concentration ``‖v‖₂/‖v‖₁ > 2/3``.
- :mod:`~influscope.analysis.runs` — run every supported study on a run directory and build its
  report (``influscope report RUN``).

Sign convention: a positive score means up-weighting the training sequence increases
``log p(completion | prompt)``.

Example:
    >>> import numpy as np
    >>> from influscope.analysis import sparsity_study, SparsityConfig
    >>> rng = np.random.default_rng(0)
    >>> result = sparsity_study(rng.pareto(1.2, (2, 300)), SparsityConfig(n_bootstrap=0))
    >>> [round(f.top_share, 2) > 0 for f in result.fits]
    [True, True]
"""

from influscope.analysis.base import StudyResult, pearson, spearman
from influscope.analysis.components import ComponentResult, expert_study, head_study
from influscope.analysis.languages import LanguageResult, language_study
from influscope.analysis.layers import (
    LayerResult,
    layer_heatmap,
    layer_study,
    layer_thirds,
    restrict_scores,
)
from influscope.analysis.overlap import (
    OverlapConfig,
    OverlapResult,
    content_tokens,
    lexical_similarity,
    overlap_study,
)
from influscope.analysis.runs import StudyConfig, load_scores, report_run, run_studies
from influscope.analysis.sparsity import (
    PowerLawFit,
    SparsityConfig,
    SparsityResult,
    fit_power_law,
    sparsity_study,
)
from influscope.analysis.tokens import (
    CONCENTRATION_THRESHOLD,
    TokenResult,
    token_concentration,
    token_study,
)
from influscope.analysis.word_order import WordOrderResult, word_order_study

__all__ = [
    "CONCENTRATION_THRESHOLD",
    "ComponentResult",
    "LanguageResult",
    "LayerResult",
    "OverlapConfig",
    "OverlapResult",
    "PowerLawFit",
    "SparsityConfig",
    "SparsityResult",
    "StudyConfig",
    "StudyResult",
    "TokenResult",
    "WordOrderResult",
    "content_tokens",
    "expert_study",
    "fit_power_law",
    "head_study",
    "language_study",
    "layer_heatmap",
    "layer_study",
    "layer_thirds",
    "lexical_similarity",
    "load_scores",
    "overlap_study",
    "pearson",
    "report_run",
    "restrict_scores",
    "run_studies",
    "sparsity_study",
    "spearman",
    "token_concentration",
    "token_study",
    "word_order_study",
]
