"""TrackStar's optimizer-aware index rows on the demo's planted-fact retrieval (issue 24, item 6).

Setting: the corpus and model of ``make demo`` (40 planted facts, each stated by 3 training
sequences, among 300 Shakespeare chunks; GPT-2 with 2 layers of width 64, MLP ``c_fc`` and
``c_proj`` tracked), trained exactly as the demo trains it (same settings and seed, one thread)
but keeping the AdamW optimizer, whose second moments ``v`` (``β₂ = 0.98``) TrackStar reads.
Queries: one per fact in the taught wording (``direct_fact_queries``) and one in a held-out
wording (the corpus' own queries, a lead-in no training sequence has).

Index variants, all LoGra 64 × 64 (orthogonal), float32 storage, the same projection seed:

* projected EK-FAC (the default index), with and without unit normalisation;
* identity curvature (plain projected gradient dot products), with and without normalisation;
* Adam-scaled (``G ⊙ (v + ε)^{-1/2}``, ``ε = 1e-8``) with identity curvature, with and without
  normalisation — the last is TrackStar without its projected-Gauss-Newton whitening ``R``;

and unprojected EK-FAC (full-rank queries) as the reference. Metrics per query set: top-1 (the
highest-ranked training sequence states the query's fact) and recall@10 (share of the fact's 3
sequences among the top 10).

    .venv/bin/python -m benchmarks.trackstar [--report docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.common import ROOT, write_section
from influscope import FitConfig, Influence, ScoreConfig
from influscope.demo.corpus import build_demo_corpus
from influscope.demo.pipeline import direct_fact_queries
from influscope.demo.train import DemoTrainConfig
from influscope.index import IndexConfig, build_index, query_index
from influscope.index.trackstar import load_adam_moments, save_adam_moments
from influscope.training import fixed_threads, make_gpt2_config, train_lm, train_tokenizer

VARIANTS = {
    "projected EK-FAC (default)": {},
    "projected EK-FAC + unit norm": {"normalize": True},
    "identity (dot product)": {"curvature": "identity"},
    "identity + unit norm (cosine)": {"curvature": "identity", "normalize": True},
    "Adam-scaled": {"curvature": "identity", "optimizer": "adam"},
    "Adam-scaled + unit norm (TrackStar w/o R)": {
        "curvature": "identity",
        "optimizer": "adam",
        "normalize": True,
    },
}


def _model(corpus, out: Path, seed: int):
    """The demo model trained as ``make demo`` does, and its Adam second moments (cached)."""
    if (out / "config.json").is_file() and (out / "moments.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(out)
        return model, tokenizer, load_adam_moments(out / "moments.safetensors", model)
    s = DemoTrainConfig(seed=seed)
    with fixed_threads(s.threads):
        torch.manual_seed(s.seed)
        tokenizer = train_tokenizer(corpus.texts, s.vocab_size)
        tokenizer.model_max_length = s.n_positions
        config = make_gpt2_config(
            tokenizer,
            n_layer=s.n_layer,
            n_embd=s.n_embd,
            n_head=s.n_head,
            n_positions=s.n_positions,
        )
        subset = [
            i
            for i, r in enumerate(corpus.records)
            for _ in range(s.fact_repeats if r.get("fact_id") else 1)
        ]
        result = train_lm(
            corpus.records, tokenizer, config, epochs=s.epochs, lr=s.lr,
            weight_decay=s.weight_decay, batch_size=s.batch_size, seed=s.seed, subset=subset,
            keep_optimizer=True,
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_adam_moments(result.model, result.optimizer, out / "moments.safetensors")
    return result.model, tokenizer, load_adam_moments(out / "moments.safetensors", result.model)


def _metrics(ranked: list[list[int]], queries: list[dict], corpus) -> tuple[float, float]:
    """(top-1 rate, mean recall@10 of the fact's sequences)."""
    top1, recall = [], []
    for rows, q in zip(ranked, queries):
        facts = set(corpus.fact_indices(q["fact_id"]))
        top1.append(corpus.records[rows[0]].get("fact_id") == q["fact_id"])
        recall.append(len(facts & set(rows[:10])) / min(10, len(facts)))
    return sum(top1) / len(top1), sum(recall) / len(recall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", default=os.environ.get("INFLUSCOPE_ASSETS", ".cache/assets"))
    parser.add_argument("--out", default=".cache/bench/trackstar", help="Cached model + moments.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=64, help="k_in = k_out of every index.")
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    args = parser.parse_args()
    os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")
    torch.set_num_threads(1)
    corpus = build_demo_corpus(args.assets, n_facts=40, n_shakespeare_chunks=300, seed=args.seed)
    t0 = time.perf_counter()
    model, tokenizer, moments = _model(corpus, Path(args.out) / f"seed{args.seed}", args.seed)
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tokenizer, device="cpu")
    train = inf.encode(corpus.records, truncate=True)
    sets = {
        "taught wording": direct_fact_queries(corpus),
        "held-out wording": [q for q in corpus.queries if q.get("fact_id")],
    }
    encoded = {k: inf.encode(v, truncate=True) for k, v in sets.items()}
    rows = []
    factors = inf.fit(train, FitConfig(curvature="ekfac"))
    cfg = ScoreConfig(query_rank=None)
    ref = {}
    for name, q in encoded.items():
        pairwise = inf.score(q, train, factors, cfg).pairwise  # (Q, N)
        ref[name] = _metrics(pairwise.topk(10, dim=1).indices.tolist(), sets[name], corpus)
    rows.append(("unprojected EK-FAC (reference)", ref))
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label, fields in VARIANTS.items():
            config = IndexConfig(k_in=args.width, k_out=args.width, dtype="float32", **fields)
            index = build_index(
                inf.tracked, train, Path(tmp) / label.replace(" ", "_"), config,
                second_moments=moments if config.optimizer == "adam" else None,
            )  # fmt: skip
            res = {}
            for name, q in encoded.items():
                top = query_index(inf.tracked, q, index, k=10)
                res[name] = _metrics(top.indices.tolist(), sets[name], corpus)
            rows.append((label, res))
            print(rows[-1], flush=True)
    lines = [
        "## TrackStar's optimizer-aware index rows: planted-fact retrieval on the demo model",
        "",
        f"Command: `.venv/bin/python -m benchmarks.trackstar {' '.join(sys.argv[1:])}`",
        "",
        f"Demo corpus (40 facts × 3 sequences + 300 Shakespeare chunks = {len(train)} "
        f"sequences), demo GPT-2 trained as `make demo` does with its AdamW state kept; LoGra "
        f"{args.width} × {args.width} orthogonal, float32. top-1: the best-ranked sequence states "
        "the query's fact; recall@10: share of the fact's 3 sequences in the top 10. "
        f"{len(sets['taught wording'])} taught-wording and {len(sets['held-out wording'])} "
        "held-out-wording queries.",
        "",
        "| index rows | top-1 taught | recall@10 taught | top-1 held-out | recall@10 held-out |",
        "|---|---|---|---|---|",
    ]
    for label, res in rows:
        (a1, a10), (b1, b10) = res["taught wording"], res["held-out wording"]
        lines.append(f"| {label} | {a1:.3f} | {a10:.3f} | {b1:.3f} | {b10:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.report:
        write_section(ROOT / args.report, "trackstar", text)


if __name__ == "__main__":
    main()
