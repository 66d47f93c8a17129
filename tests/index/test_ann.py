"""FAISS approximate search over the gradient index: flat = exhaustive, IVF/PQ recall on planted
clusters, exact re-ranking, chunked build = one-shot build, stale ANN indexes refused, and
retrieval through an ANN index."""

from __future__ import annotations

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import ConfigError, DataError, Influence, StaleArtifactError
from influscope.index import (
    AnnConfig,
    IndexConfig,
    build_ann,
    build_index,
    open_ann,
    preconditioned_queries,
    rerank,
    write_rows_index,
)
from influscope.index.retrieve import retrieve

pytest.importorskip("faiss")


def _planted(n: int, dim: int, n_clusters: int, seed: int) -> torch.Tensor:
    """Rows in planted clusters: centre + low-rank spread + small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(n_clusters, dim, generator=g)
    basis = torch.randn(n_clusters, 4, dim, generator=g)
    c = torch.randint(0, n_clusters, (n,), generator=g)
    z = torch.randn(n, 4, generator=g)
    return (
        centres[c]
        + torch.einsum("nr,nrd->nd", z, basis[c])
        + 0.1 * torch.randn(n, dim, generator=g)
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rows = _planted(6000, 64, 40, seed=0)  # (N, D)
    index = write_rows_index(tmp_path_factory.mktemp("ann") / "idx", list(rows.split(1700)))
    g = torch.Generator().manual_seed(1)
    queries = -(
        rows[torch.randperm(len(rows), generator=g)[:30]] + 0.5 * torch.randn(30, 64, generator=g)
    )
    return index, rows, queries


def _recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))
    return hits / exact.numel()


def test_flat_equals_exhaustive_top_k(planted):
    index, rows, queries = planted
    exact = index.search(queries, k=10)
    ann = build_ann(index, AnnConfig(backend="faiss-flat", chunk=500))
    top = ann.search(queries, k=10)
    assert torch.equal(top.indices, exact.indices)
    torch.testing.assert_close(top.scores, exact.scores, rtol=1e-5, atol=1e-4)
    ref = -(queries.double() @ rows.double().t())  # (Q, N) float64 reference
    torch.testing.assert_close(
        top.scores.double(), ref.topk(10, dim=1).values, rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize(
    ("backend", "mips", "floor"),
    [
        ("faiss-ivf", "augment", 0.95),
        ("faiss-ivf", "direct", 0.95),
        ("faiss-pq", "augment", 0.9),
        ("faiss-ivfpq", "augment", 0.9),
        ("faiss-ivfpq", "direct", 0.9),
    ],
)
def test_approximate_recall_at_10_after_reranking(planted, backend, mips, floor):
    index, _, queries = planted
    exact = index.search(queries, k=10)
    cfg = AnnConfig(backend=backend, mips=mips, nlist=40, nprobe=4, m=16, nbits=6, chunk=1000)
    ann = build_ann(index, cfg, name=f"{backend}-{mips}")
    cand = ann.search(queries, k=100)  # k' = 10 k candidates
    top = rerank(index, queries, cand.indices, k=10)
    assert _recall(top.indices, exact.indices) >= floor
    # the candidates' scores are now exact
    torch.testing.assert_close(top.scores, -(queries * index.rows(top.indices.flatten()).view(30, 10, -1).transpose(0, 1)).sum(-1).t(), rtol=1e-5, atol=1e-4)  # fmt: skip


def test_augmented_search_returns_inner_products(planted):
    # IVF-Flat stores rows exactly: its scores, mapped back from ‖x' − q'‖², are ⟨-q̃, g̃⟩
    index, rows, queries = planted
    ann = build_ann(index, AnnConfig(backend="faiss-ivf", nlist=10, nprobe=10), name="all-lists")
    top = ann.search(queries, k=10)
    ref = -(queries.double() @ rows.double().t())  # (Q, N)
    assert ann.max_norm == pytest.approx(float(rows.double().norm(dim=1).max()), rel=1e-6)
    assert torch.equal(top.indices, ref.topk(10, dim=1).indices)  # every list scanned: exact
    scale = ann.max_norm**2 + float(queries.double().norm(dim=1).max()) ** 2
    torch.testing.assert_close(
        top.scores.double(), ref.gather(1, top.indices), rtol=0, atol=1e-6 * scale
    )


def test_rerank_gives_the_exact_scores_of_the_candidates(planted):
    index, rows, queries = planted
    g = torch.Generator().manual_seed(3)
    cand = [
        torch.randperm(len(rows), generator=g)[: 5 + 7 * i].tolist() for i in range(len(queries))
    ]
    cand[0] = cand[0][:3]  # fewer candidates than k: padded with -1 / -inf
    top = rerank(index, queries, cand, k=8, chunk=13)
    ref = -(queries.double() @ rows.double().t())  # (Q, N)
    for qi, c in enumerate(cand):
        s, o = ref[qi, c].sort(descending=True)
        n = min(8, len(c))
        assert top.indices[qi, :n].tolist() == [c[j] for j in o[:n].tolist()]
        torch.testing.assert_close(top.scores[qi, :n].double(), s[:n], rtol=1e-5, atol=1e-4)
    assert top.indices[0, 3:].eq(-1).all() and top.scores[0, 3:].eq(float("-inf")).all()
    with pytest.raises(DataError, match="has 6000 rows"):
        rerank(index, queries[:1], [[6000]], k=1)


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-ivf", "faiss-ivfpq"])
def test_build_in_chunks_equals_build_at_once(planted, tmp_path, backend):
    index, _, queries = planted
    cfg = AnnConfig(backend=backend, nlist=20, nprobe=3, m=8, nbits=5)
    chunked = build_ann(
        index, AnnConfig(**{**cfg.to_dict(), "chunk": 333}), name=f"chunked-{backend}"
    )
    whole = build_ann(
        index, AnnConfig(**{**cfg.to_dict(), "chunk": 10**6}), name=f"whole-{backend}"
    )
    a, b = chunked.search(queries, k=20), whole.search(queries, k=20)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    # reopened from disk: same results
    c = open_ann(index, f"chunked-{backend}").search(queries, k=20)
    assert torch.equal(a.indices, c.indices) and torch.equal(a.scores, c.scores)


def test_stale_ann_index_is_refused(tmp_path):
    rows = _planted(500, 16, 5, seed=0)
    index = write_rows_index(tmp_path / "idx", [rows])
    build_ann(index, AnnConfig(backend="faiss-flat"))
    with pytest.raises(StaleArtifactError, match=r"built with other settings.*overwrite=True"):
        build_ann(index, AnnConfig(backend="faiss-flat", seed=1), name="faiss-flat")
    index = write_rows_index(tmp_path / "idx", [rows.flip(0)])  # the index is rebuilt differently
    with pytest.raises(StaleArtifactError, match=r"built for another gradient index.*--overwrite"):
        open_ann(index, "faiss-flat")
    with pytest.raises(StaleArtifactError, match="other gradient index"):
        build_ann(index, AnnConfig(backend="faiss-flat"))
    rebuilt = build_ann(index, AnnConfig(backend="faiss-flat"), overwrite=True)
    q = torch.randn(3, 16)
    assert torch.equal(rebuilt.search(q, k=5).indices, index.search(q, k=5).indices)
    with pytest.raises(DataError, match=r"No ANN index 'nope'.*influscope ann"):
        open_ann(index, "nope")


def test_bad_ann_settings_are_refused_before_work(tmp_path):
    index = write_rows_index(tmp_path / "idx", [torch.randn(50, 12)])
    with pytest.raises(ConfigError, match="m must divide the row width D = 12; received m=5"):
        build_ann(index, AnnConfig(backend="faiss-pq", m=5, mips="direct"))
    with pytest.raises(ConfigError, match=r"nothing to build\. Choose a FAISS backend"):
        build_ann(index, AnnConfig(backend="exhaustive"))
    with pytest.raises(ConfigError, match="backend must be one of"):
        AnnConfig(backend="annoy")


def test_retrieve_through_an_ann_index_equals_the_exact_scan(tmp_path):
    model = tiny_gpt2(n_embd=16)
    train = random_lm_data(20, seed=1)
    queries = random_lm_data(3, seed=2, prompt_len=3)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    cfg = IndexConfig(k_in=8, k_out=8, dtype="float32", batch_size=4, shard_size=7)
    index = build_index(inf.tracked, train, tmp_path / "idx", cfg)
    exact = retrieve(inf, queries, train, index=index, top_k=4)
    ann = build_ann(index, AnnConfig(backend="faiss-ivf", nlist=2, nprobe=2))  # every list
    via = retrieve(inf, queries, train, ann=ann, ann_k=8, top_k=4)
    assert via.indices == exact.indices and via.candidates["ann"] == 8
    torch.testing.assert_close(torch.tensor(via.scores), torch.tensor(exact.scores))
    q = preconditioned_queries(inf.tracked, queries, index)
    assert q.shape == (3, index.meta["dim"])
    with pytest.raises(ConfigError, match="both candidate sources"):
        retrieve(inf, queries, train, query_texts=["a"] * 3, train_texts=["b"] * 20, ann=ann)
    other = build_index(inf.tracked, train, tmp_path / "other", cfg)  # same rows, another index
    with pytest.raises(ConfigError, match=r"belongs to .*idx, not to the index given.*open_ann"):
        retrieve(inf, queries, train, index=other, ann=ann)
