"""Persistent index of projected training gradients: build (resumable, per-rank shards),
memory-mapped storage, chunked top-k queries, FAISS approximate search with exact re-ranking,
and two-stage retrieval."""

from influscope.index.ann import ANN_BACKENDS, AnnConfig, AnnIndex, build_ann, open_ann
from influscope.index.build import build_index, load_curvature, preconditioned_queries, query_index
from influscope.index.config import INDEX_DTYPES, IndexConfig
from influscope.index.rerank import rerank
from influscope.index.store import GradientIndex, TopK, write_rows_index

__all__ = [
    "ANN_BACKENDS",
    "INDEX_DTYPES",
    "AnnConfig",
    "AnnIndex",
    "GradientIndex",
    "IndexConfig",
    "TopK",
    "build_ann",
    "build_index",
    "load_curvature",
    "open_ann",
    "preconditioned_queries",
    "query_index",
    "rerank",
    "write_rows_index",
]
