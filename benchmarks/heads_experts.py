"""Per-head and per-expert attribution: cost, exactness and concentration (issue 24, items 2-3).

1. **Heads** on the ``small`` benchmark GPT-2 (2 layers, 4 heads, width 128, trained on
   Shakespeare; :func:`benchmarks.common.prepare`): EK-FAC over the attention projections
   (``modules="attn"``: ``c_attn``, ``c_proj``), ``--n-train`` windows × ``--n-queries`` held-out
   queries, scored with ``per_layer`` only and with ``per_head`` too (the same process, in turn):
   seconds of each, the largest ``|Σ_heads − layer|`` relative to the largest layer term, and how
   concentrated each query's influence mass is (the leading head's share, :func:`head_study`).
2. **Experts** on tiny Mixtral-shaped MoE LMs built from configs (random weights, float32,
   hidden ``--hidden``, expert width ``2 × hidden``, top-2 routing, 2 layers) with ``E`` experts,
   beside the dense Llama of the same shape (one MLP of the expert's width): EK-FAC fit and
   score seconds and factor MiB over ``modules="mlp"`` (experts + router), against the dense
   model (the claim checked: a block of ``E`` experts costs about ``E×`` a dense MLP).

    .venv/bin/python -m benchmarks.heads_experts [--report docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from benchmarks.common import ROOT, load_average, load_model, prepare, write_section
from influscope import EncodedDataset, FitConfig, Influence, ScoreConfig
from influscope.analysis.components import head_study
from influscope.toy import random_lm_data


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _encoded(ids: torch.Tensor) -> EncodedDataset:
    return EncodedDataset(
        [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    )


def heads(n_train: int, n_queries: int) -> list[str]:
    data = prepare("small", n_train, n_queries)
    model = load_model(data)
    inf = Influence(model, "causal_lm", modules="attn", device="cpu")
    train, queries = _encoded(data.train), _encoded(data.queries)
    op, t_fit = _timed(inf.fit, train, FitConfig(curvature="ekfac", batch_size=8))
    plain, t_plain = _timed(inf.score, queries, train, op, ScoreConfig(per_layer=True))
    cfg = ScoreConfig(per_layer=True, per_head=True)
    scores, t_head = _timed(inf.score, queries, train, op, cfg)
    layer_of = [n.rsplit(":", 1)[0] for n in scores.head_names]
    summed = torch.stack(
        [
            scores.per_head[..., [i for i, n in enumerate(layer_of) if n == layer]].sum(-1)
            for layer in scores.layer_names
        ],
        -1,
    )  # (Q, N, L)
    err = float((summed - scores.per_layer).abs().max() / scores.per_layer.abs().max())
    same = float((scores.pairwise - plain.pairwise).abs().max() / plain.pairwise.abs().max())
    study = head_study(scores)
    share = np.asarray(study.abs_share)  # (Q, H)
    lead = share.max(1)
    names = [study.components[i] for i in share.argmax(1)]
    common = max(set(names), key=names.count)
    return [
        f"**Heads** (`small` GPT-2: 2 layers × 4 heads, width 128; EK-FAC over `c_attn`, "
        f"`c_proj`; {n_train} training windows × {n_queries} held-out queries of 128 tokens; "
        f"{len(scores.head_names)} head groups incl. `c_proj` biases). Fit {t_fit:.1f} s. Score "
        f"with `per_layer`: {t_plain:.2f} s; with `per_head` too: {t_head:.2f} s "
        f"({t_head / t_plain:.2f}×). Heads sum to the layer terms to {err:.1e} (relative, "
        f"float32); pairwise scores with and without `per_head` differ by {same:.1e}. The "
        f"leading head carries {lead.mean():.0%} of a query's influence mass on average (range "
        f"{lead.min():.0%}–{lead.max():.0%}; uniform over {share.shape[1]} groups would be "
        f"{1 / share.shape[1]:.0%}); most often `{common}` ({names.count(common)} of "
        f"{len(names)} queries).",
    ]


def moe_model(n_experts: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    if n_experts == 0:
        cfg, cls = LlamaConfig(intermediate_size=2 * hidden, **common), LlamaForCausalLM
    else:
        cfg = MixtralConfig(intermediate_size=2 * hidden, num_local_experts=n_experts,
                            num_experts_per_tok=2, **common)  # fmt: skip
        cls = MixtralForCausalLM
        cfg._experts_implementation = "eager"
    cfg._attn_implementation = "eager"
    return cls(cfg).float().eval()


def experts(hidden: int, n_seq: int) -> list[str]:
    train = random_lm_data(n_seq, vocab=256, min_len=32, max_len=32, seed=1)
    queries = random_lm_data(8, vocab=256, min_len=32, max_len=32, seed=2, prompt_len=16)
    lines = [
        "",
        f"**Experts** (tiny Mixtral-shaped LMs from configs, random weights, float32: 2 layers, "
        f"hidden {hidden}, expert width {2 * hidden}, top-2 routing; EK-FAC over `modules="
        f'"mlp"` = experts + router; {n_seq} random sequences × 32 tokens, 8 queries; dense row: '
        "the Llama of the same shape, one MLP of the expert width):",
        "",
        "| model | tracked layers | fit s (× dense) | score s (× dense) | factors MiB (× dense) |",
        "|---|---|---|---|---|",
    ]
    dense = None
    for n_experts in (0, 4, 8, 16):
        inf = Influence(moe_model(n_experts, hidden), "causal_lm", modules="mlp", device="cpu")
        op, t_fit = _timed(inf.fit, train, FitConfig(curvature="ekfac", batch_size=8))
        _, t_score = _timed(inf.score, queries, train, op, ScoreConfig(per_layer=True))
        mib = sum(t.numel() * t.element_size() for t in op.tensors().values()) / 2**20
        dense = dense or (t_fit, t_score, mib)
        name = "dense Llama" if n_experts == 0 else f"Mixtral, E = {n_experts}"
        lines.append(
            f"| {name} | {len(inf.layers)} | {t_fit:.2f} ({t_fit / dense[0]:.1f}×) | "
            f"{t_score:.2f} ({t_score / dense[1]:.1f}×) | {mib:.2f} ({mib / dense[2]:.1f}×) |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-queries", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--n-seq", type=int, default=64)
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    args = parser.parse_args()
    os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")
    torch.set_num_threads(1)
    lines = [
        "## Per-head and per-expert attribution: cost and concentration",
        "",
        f"Command: `.venv/bin/python -m benchmarks.heads_experts {' '.join(sys.argv[1:])}` "
        "(CPU, one thread)",
        "",
    ]
    lines += heads(args.n_train, args.n_queries)
    lines += experts(args.hidden, args.n_seq)
    lines += ["", f"Load average after the run: {load_average()} (2 cores, shared)."]
    text = "\n".join(lines)
    print(text)
    if args.report:
        write_section(ROOT / args.report, "heads_experts", text)


if __name__ == "__main__":
    main()
