"""Persistent index of projected training gradients: build (resumable, per-rank shards),
memory-mapped storage, chunked top-k queries, and two-stage retrieval."""

from influscope.index.build import build_index, load_curvature, preconditioned_queries, query_index
from influscope.index.config import INDEX_DTYPES, IndexConfig
from influscope.index.store import GradientIndex, TopK

__all__ = [
    "INDEX_DTYPES",
    "GradientIndex",
    "IndexConfig",
    "TopK",
    "build_index",
    "load_curvature",
    "preconditioned_queries",
    "query_index",
]
