"""The gradient index: chunked top-k equals the full ranking, storage dtypes, resumable shards,
stale-index refusal, and two-stage (BM25 → index → EK-FAC) retrieval."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig, StaleArtifactError
from influscope.filtering import BM25Filter
from influscope.index import GradientIndex, IndexConfig, build_index, preconditioned_queries
from influscope.index.retrieve import retrieve

CFG = IndexConfig(k_in=8, k_out=8, dtype="float32", batch_size=4, shard_size=7)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("index") / "idx"
    model = tiny_gpt2(n_embd=16)
    train = random_lm_data(20, seed=1)
    queries = random_lm_data(3, seed=2, prompt_len=3)
    inf = Influence(model, "causal_lm", modules="mlp", device="cpu")
    index = build_index(inf.tracked, train, root, CFG)
    q = preconditioned_queries(inf.tracked, queries, index)
    return inf, train, queries, index, q


def test_chunked_top_k_equals_full_ranking(built):
    _, train, _, index, q = built
    assert len(index.meta["shards"]) == 3 and index.n_rows == len(train)
    top, full = index.search(q, k=5, chunk=2, return_all=True)
    assert full.shape == (3, len(train))
    ref_s, ref_i = full.topk(5, dim=1)
    torch.testing.assert_close(top.scores, ref_s)
    assert torch.equal(top.indices, ref_i)
    # rows() reads the same numbers as the full scan
    torch.testing.assert_close(-(q @ index.rows([0, 19, 7]).t()), full[:, [0, 19, 7]])
    # candidates restrict the search
    cand = [[1, 2, 3], [19], list(range(20))]
    restricted = index.search(q, k=2, candidates=cand)
    assert set(restricted.indices[0].tolist()) <= {1, 2, 3}
    assert restricted.indices[1, 0] == 19 and restricted.scores[1, 1] == float("-inf")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_storage_keeps_scores(built, tmp_path, dtype):
    inf, train, _, index, q = built
    cfg = IndexConfig(**{**CFG.to_dict(), "dtype": dtype})
    low = build_index(inf.tracked, train, tmp_path / dtype, cfg)
    _, full = index.search(q, k=1, return_all=True)
    _, approx = low.search(q, k=1, return_all=True)
    tol = {"float16": 2e-3, "bfloat16": 2e-2}[dtype]
    torch.testing.assert_close(approx, full, rtol=tol, atol=tol * full.abs().max())


def test_missing_shard_is_rebuilt_identically(built):
    inf, train, _, index, _ = built
    shard = index.root / "shards" / "shard-00001.npy"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shard.parent.glob("*.npy")}
    shard.unlink()
    with pytest.raises(Exception, match="incomplete"):
        GradientIndex(index.root)
    build_index(inf.tracked, train, index.root, CFG)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shard.parent.glob("*.npy")}
    assert after.keys() == before.keys()
    assert after["shard-00001.npy"][1] == before["shard-00001.npy"][1]
    assert after["shard-00000.npy"] == before["shard-00000.npy"]  # untouched


def test_stale_index_is_refused(built):
    inf, train, _, index, _ = built
    with pytest.raises(StaleArtifactError, match="different data"):
        build_index(inf.tracked, train.subset(range(10)), index.root, CFG)


def test_cache_budget_is_not_part_of_the_fingerprint(built, tmp_path):
    """``cache_mb`` changes only memory: the same index is reused, and one built without the
    replay cache is identical."""
    inf, train, _, index, _ = built
    build_index(inf.tracked, train, index.root, replace(CFG, cache_mb=0))
    other = build_index(inf.tracked, train, tmp_path / "nocache", replace(CFG, cache_mb=0))
    for k in range(len(index.meta["shards"])):
        assert (other.root / "shards" / f"shard-{k:05d}.npy").read_bytes() == (
            index.root / "shards" / f"shard-{k:05d}.npy"
        ).read_bytes()


def _texts(data) -> list[str]:
    return [" ".join(f"w{int(t)}" for t in ex["input_ids"]) for ex in data.examples]


def test_bm25_ranks_the_overlapping_text_first():
    f = BM25Filter(["the cat sat on the mat", "a dog ran", "cats and dogs", "dog dog dog"])
    assert f.candidates(["dog"], k=2) == [[3, 1]]
    assert f.scores("unknown words").max() == 0


def test_two_stage_retrieval(built):
    inf, train, queries, index, _ = built
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4))
    exact = inf.score(queries, train, op, ScoreConfig(query_rank=None)).pairwise
    texts, qtexts = _texts(train), _texts(queries)
    # every stage wide open: the final ranking is the exact EK-FAC ranking
    res = retrieve(inf, queries, train, query_texts=qtexts, train_texts=texts, bm25_k=20,
                   index=index, index_k=20, factors=op, top_k=4)  # fmt: skip
    assert res.stage == "ekfac"
    ref_s, ref_i = exact.topk(4, dim=1)
    assert res.indices == ref_i.tolist()
    torch.testing.assert_close(torch.tensor(res.scores, dtype=torch.float64), ref_s)
    # narrow BM25: the result is drawn from the BM25 candidates, scored exactly
    bm = BM25Filter(texts).candidates(qtexts, 5)
    res = retrieve(inf, queries, train, query_texts=qtexts, train_texts=texts, bm25_k=5,
                   index=index, index_k=3, factors=op, top_k=2)  # fmt: skip
    for qi in range(len(queries)):
        assert set(res.indices[qi]) <= set(bm[qi])
        for m, s in zip(res.indices[qi], res.scores[qi]):
            assert s == pytest.approx(float(exact[qi, m]), rel=1e-9)
    # index only
    res = retrieve(inf, queries, train, index=index, top_k=3)
    assert res.stage == "index" and all(len(r) == 3 for r in res.indices)
