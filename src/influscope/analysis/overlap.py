r"""Abstraction vs. token overlap: does influence follow shared words or shared meaning?

Grosse et al. (2023, §5.3) observed that the top influences of small models share many tokens
with the query, while those of larger models are more often related in meaning only. For each
query ``q`` this study measures, across the ``N`` scored training sequences ``z_m``:

- the correlation (Pearson and Spearman) between the influence ``I_q(z_m)`` and the lexical
  similarity ``sim(q, z_m)``, either BM25 (Robertson & Zaragoza 2009, Lucene variant, computed
  by the maintained ``bm25s`` package)

  .. math:: \mathrm{BM25}(q, d) = \sum_{t ∈ q} \mathrm{IDF}(t)
      \frac{tf_{t,d}}{tf_{t,d} + k_1 (1 − b + b |d| / \overline{|d|})},
      \quad \mathrm{IDF}(t) = \log\left(\frac{N − n_t + 0.5}{n_t + 0.5} + 1\right)

  with ``k1 = 1.5``, ``b = 0.75`` (the Lucene form drops the constant factor ``k1 + 1`` of the
  original numerator, which changes neither ranks nor correlations), or TF-IDF cosine
  similarity (``tf · (log((1 + N)/(1 + n_t)) + 1)``, rows ℓ2-normalised);
- the fraction of the top-``k`` proponents that share at least one *content token* (a lower-cased
  word that is not a stop word of en/fr/de/es) with the query, next to the same fraction over all
  sequences (the chance level).

Run over several models (the benchmark uses the demo GPT-2 at two widths), a smaller correlation
and a top-``k`` fraction closer to chance mean influence follows the words less.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from influscope.analysis.base import as_matrix, clean, finite_mean, fmt, pearson, spearman
from influscope.errors import ConfigError, DataError
from influscope.report.html import html_paragraph, html_table
from influscope.report.views import Section

__all__ = [
    "STOP_WORDS",
    "OverlapConfig",
    "OverlapResult",
    "content_tokens",
    "lexical_similarity",
    "overlap_study",
]

#: Function words of the demo's four languages, ignored as content tokens.
_STOP_TEXT = """
a an and are as at be by for from has have he her his i in is it its me my not of on or our she
so that the their them they this to was we were what which who will with you your thou thee thy
thine hath doth art shall
le la les un une des de du et est en à au aux il elle ils qui que pour par sur dans son sa ses ce
cette
der die das ein eine einer eines und ist im von zu mit den dem des sich auf für als
el los las unos unas y es del al por con se su sus
"""
STOP_WORDS = frozenset(_STOP_TEXT.split())

_WORD = re.compile(r"[^\W_]+")


def content_tokens(text: str) -> list[str]:
    """Lower-cased words of ``text`` minus :data:`STOP_WORDS` and single characters."""
    return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in STOP_WORDS]


@dataclass(frozen=True)
class OverlapConfig:
    """Settings of the overlap study.

    Attributes:
        method: ``"bm25"`` or ``"tfidf"``.
        top_k: Number of top proponents checked for shared content tokens.
        k1: BM25 term-frequency saturation.
        b: BM25 length normalisation.
    """

    method: str = "bm25"
    top_k: int = 10
    k1: float = 1.5
    b: float = 0.75

    def __post_init__(self) -> None:
        if self.method not in ("bm25", "tfidf"):
            raise ConfigError(f"Invalid method: {self.method!r}. Supported: ('bm25', 'tfidf').")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be ≥ 1, received {self.top_k}.")
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ConfigError(f"Need k1 ≥ 0 and 0 ≤ b ≤ 1, received k1={self.k1}, b={self.b}.")


def _bm25(queries: list[list[str]], docs: list[list[str]], k1: float, b: float) -> np.ndarray:
    import bm25s  # optional extra "filter"

    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")  # lucene IDF = the one in the docstring
    # bm25s cannot index an empty document: give those a token no query contains.
    retriever.index([d or ["\x00"] for d in docs], show_progress=False)
    vocab = {t for d in docs for t in d}
    out = np.zeros((len(queries), len(docs)))
    for i, q in enumerate(queries):
        known = [t for t in q if t in vocab]
        if known:
            out[i] = retriever.get_scores(known)
    return out


def _tfidf(queries: list[list[str]], docs: list[list[str]]) -> np.ndarray:
    vocab = {t: i for i, t in enumerate(sorted({t for d in docs for t in d}))}
    n = len(docs)
    df = np.zeros(len(vocab))
    for d in docs:
        for t in set(d):
            df[vocab[t]] += 1
    idf = np.log((1 + n) / (1 + df)) + 1  # (V,)

    def matrix(texts: list[list[str]]) -> np.ndarray:
        m = np.zeros((len(texts), len(vocab)))  # (rows, V)
        for r, toks in enumerate(texts):
            for t, c in Counter(toks).items():
                if t in vocab:
                    m[r, vocab[t]] = c
        m *= idf
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        return m / np.where(norms > 0, norms, 1.0)

    return matrix(queries) @ matrix(docs).T  # (Q, N) cosine similarities


def lexical_similarity(
    query_texts: Sequence[str],
    train_texts: Sequence[str],
    method: str = "bm25",
    *,
    k1: float = 1.5,
    b: float = 0.75,
) -> np.ndarray:
    """Lexical similarity of each query to each training text, on content tokens.

    Args:
        query_texts: ``Q`` query texts (prompt and completion).
        train_texts: ``N`` training texts.
        method: ``"bm25"`` (query → document score) or ``"tfidf"`` (cosine similarity).
        k1: BM25 term-frequency saturation.
        b: BM25 length normalisation.

    Returns:
        ``(Q, N)`` similarities (0 where no content token is shared).

    Example:
        >>> sim = lexical_similarity(["capital of Velmora"], ["Velmora is big", "the sea"], "tfidf")
        >>> bool(sim[0, 0] > 0 == sim[0, 1])
        True
    """
    OverlapConfig(method=method, k1=k1, b=b)  # validates
    if not train_texts:
        raise DataError("lexical_similarity needs at least one training text.")
    q_tok = [content_tokens(t) for t in query_texts]
    d_tok = [content_tokens(t) for t in train_texts]
    return _bm25(q_tok, d_tok, k1, b) if method == "bm25" else _tfidf(q_tok, d_tok)


@dataclass(frozen=True)
class OverlapResult:
    """Influence vs. lexical overlap, per query.

    Attributes:
        query_names: One label per query.
        pearson: Pearson correlation of influence and similarity, per query.
        spearman: Spearman correlation, per query.
        top_k_shared: Fraction of the top-``k`` proponents sharing a content token with the query.
        chance_shared: Fraction of all scored sequences sharing one (the chance level).
        config: The settings used.
    """

    query_names: list[str]
    pearson: list[float]
    spearman: list[float]
    top_k_shared: list[float]
    chance_shared: list[float]
    config: OverlapConfig

    def summary(self) -> dict[str, Any]:
        return clean(
            {
                "method": self.config.method,
                "top_k": self.config.top_k,
                "mean_pearson": finite_mean(self.pearson),
                "mean_spearman": finite_mean(self.spearman),
                "mean_top_k_shared": finite_mean(self.top_k_shared),
                "mean_chance_shared": finite_mean(self.chance_shared),
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": "overlap",
            "config": clean(vars(self.config)),
            "summary": self.summary(),
            "queries": clean(
                [
                    {"query": n, "pearson": p, "spearman": s, "top_k_shared": t, "chance": c}
                    for n, p, s, t, c in zip(
                        self.query_names,
                        self.pearson,
                        self.spearman,
                        self.top_k_shared,
                        self.chance_shared,
                    )
                ]
            ),
        }

    def to_section(self) -> Section:
        s = self.summary()
        k = self.config.top_k
        text = html_paragraph(
            f"Correlation between influence and {self.config.method.upper()} similarity to the "
            f"query: mean Pearson {fmt(s['mean_pearson'])}, mean Spearman "
            f"{fmt(s['mean_spearman'])}. On average {fmt(s['mean_top_k_shared'])} of the top-{k} "
            f"proponents share a content word with the query, against "
            f"{fmt(s['mean_chance_shared'])} of all sequences."
        )
        rows = [
            [n, fmt(p), fmt(r), fmt(t), fmt(c)]
            for n, p, r, t, c in zip(
                self.query_names, self.pearson, self.spearman, self.top_k_shared, self.chance_shared
            )
        ]
        table = html_table(
            ["query", "Pearson", "Spearman", f"top-{k} sharing a word", "all sharing a word"],
            rows,
            caption="Per query, across all scored training sequences.",
        )
        return Section("Abstraction vs. token overlap", text + table)


def overlap_study(
    scores: Any,
    query_texts: Sequence[str],
    train_texts: Sequence[str],
    config: OverlapConfig | None = None,
    query_names: Sequence[str] | None = None,
    similarity: np.ndarray | None = None,
) -> OverlapResult:
    """Correlate each query's influence with its lexical similarity to the training texts.

    Args:
        scores: ``(Q, N)`` influence scores.
        query_texts: ``Q`` query texts (prompt + completion), in score-row order.
        train_texts: ``N`` training texts, in score-column order.
        config: Study settings.
        query_names: One label per query.
        similarity: Precomputed ``(Q, N)`` similarities (default: :func:`lexical_similarity`).

    Returns:
        Per-query correlations and top-``k`` shared-token fractions.
    """
    config = config or OverlapConfig()
    mat = as_matrix(scores)
    n_q, n = mat.shape
    if len(query_texts) != n_q or len(train_texts) != n:
        raise DataError(
            f"Scores are {n_q} x {n} but received {len(query_texts)} query texts and "
            f"{len(train_texts)} training texts. Pass them in the order they were scored."
        )
    sim = (
        lexical_similarity(query_texts, train_texts, config.method, k1=config.k1, b=config.b)
        if similarity is None
        else np.asarray(similarity, dtype=np.float64)
    )
    if sim.shape != mat.shape:
        raise DataError(f"similarity has shape {sim.shape}, expected {mat.shape}.")
    train_sets = [set(content_tokens(t)) for t in train_texts]
    pears, spears, tops, chances = [], [], [], []
    for q in range(n_q):
        words = set(content_tokens(query_texts[q]))
        shares = np.array([bool(words & s) for s in train_sets])  # (N,)
        top = np.argsort(-mat[q], kind="stable")[: config.top_k]
        pears.append(pearson(mat[q], sim[q]))
        spears.append(spearman(mat[q], sim[q]))
        tops.append(float(shares[top].mean()))
        chances.append(float(shares.mean()))
    names = list(query_names) if query_names is not None else [f"query {q}" for q in range(n_q)]
    return OverlapResult(names, pears, spears, tops, chances, config)
