"""BM25 candidate filtering (Grosse et al. 2023, App. A) with the ``bm25s`` library.

Score of training text ``d`` for query ``q`` (Lucene variant, ``k1 = 1.5``, ``b = 0.75``):

.. math:: \\mathrm{BM25}(q, d) = \\sum_{t ∈ q} \\mathrm{IDF}(t)
    \\frac{f_{t,d}\\,(k_1 + 1)}{f_{t,d} + k_1 (1 - b + b\\,|d| / \\overline{|d|})},
    \\qquad \\mathrm{IDF}(t) = \\log\\Big(\\frac{C - n_t + 0.5}{n_t + 0.5} + 1\\Big)

with ``C`` the number of training texts and ``n_t`` those containing ``t``. Texts are lower-cased
and split into word tokens of two or more characters (``bm25s.tokenize``); stop words are kept
unless ``stopwords="en"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from influscope.errors import ConfigError, DataError


def _bm25s():
    try:
        import bm25s
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "BM25 filtering needs the 'bm25s' package: pip install 'influscope[filter]'."
        ) from None
    return bm25s


class BM25Filter:
    """A BM25 index over training texts.

    Args:
        texts: One text per training sequence (position ``m`` ↔ training sequence ``m``).
        k1: Term-frequency saturation (default 1.5).
        b: Length normalisation (default 0.75).
        stopwords: ``None`` (keep every word) or a ``bm25s`` stop-word list name such as ``"en"``.

    Example:
        >>> f = BM25Filter(["the cat sat", "a dog ran", "cats and dogs"])
        >>> f.candidates(["dog"], k=1)
        [[1]]
    """

    def __init__(
        self,
        texts: Sequence[str],
        k1: float = 1.5,
        b: float = 0.75,
        stopwords: str | None = None,
    ) -> None:
        if not texts:
            raise DataError("BM25 needs at least one training text, received none.")
        bm25s = _bm25s()
        self.n = len(texts)
        self.stopwords = stopwords
        self.retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
        tokens = bm25s.tokenize(list(texts), stopwords=stopwords, show_progress=False)
        self.retriever.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every training text for one query: ``(N,)``."""
        words = _bm25s().tokenize(
            [query], stopwords=self.stopwords, return_ids=False, show_progress=False
        )[0]
        return np.asarray(self.retriever.get_scores(words), dtype=np.float64)

    def candidates(self, queries: Sequence[str], k: int = 10_000) -> list[list[int]]:
        """The ``k`` best training positions per query, best first (ties by position)."""
        if k < 1:
            raise ConfigError(f"k must be ≥ 1, received {k}.")
        out = []
        for q in queries:
            s = self.scores(q)
            order = np.lexsort((np.arange(self.n), -s))  # by score desc, then position
            out.append(order[: min(k, self.n)].tolist())
        return out


def bm25_candidates(
    queries: Sequence[str], texts: Sequence[str], k: int = 10_000, stopwords: str | None = None
) -> list[list[int]]:
    """Top-``k`` training positions per query by BM25 (see :class:`BM25Filter`)."""
    return BM25Filter(texts, stopwords=stopwords).candidates(queries, k)
