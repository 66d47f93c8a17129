"""Candidate filtering before any gradient work. Implementations: :func:`bm25_candidates`
(BM25 via the maintained ``bm25s`` library, install ``influscope[filter]``)."""

from influscope.filtering.bm25 import BM25Filter, bm25_candidates

__all__ = ["BM25Filter", "bm25_candidates"]
