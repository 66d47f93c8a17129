"""Influence through LoRA adapters: does it find the fine-tuning sequence that taught a fact?

Set-up (LESS-style, Xia et al. 2024, but with ground truth): the demo model (a 2-layer GPT-2
trained on Shakespeare plus 40 planted facts, see ``projection_agreement.py``) is fine-tuned
with LoRA (Hu et al. 2022; rank 8 on every attention and MLP projection, base weights frozen)
on a new corpus: ``--facts`` *new* planted facts (names the base model never saw), 3 wordings
each, mixed with Shakespeare windows. Each fact's query is its taught wording up to the
answer; a hit means the top-ranked fine-tuning sequence states that fact (chance: 3 of N).

Compared, all on the same fine-tuned model and data:

* ``ekfac / lora``: EK-FAC over the adapter matrices (``modules="lora"``), the default for a
  LoRA model;
* ``datainf / lora``: DataInf's closed-form inverse (Kwon et al. 2024) over the adapter
  matrices, built for exactly this setting;
* ``identity / lora``: the plain gradient dot product over the adapter weights (what LESS
  ranks with, up to normalisation);
* ``ekfac / base mlp``: EK-FAC over the frozen base MLP weights (``.mlp.*.base_layer``), i.e.
  influence as if the base weights had been fine-tuned: the quantity the "mlp" preset gives a
  LoRA model, which influscope warns about;

each plain and RelatIF-normalised (Barshan et al. 2020: divided by ``sqrt`` of the training
sequence's self-influence), which discounts training sequences whose gradients are large
everywhere (long, high-loss windows) against memorised ones whose gradients are small.

Run: ``python -m benchmarks.lora --report docs/benchmarks.md`` (a few minutes on 2 cores).

``--model smollm2``: the same question on a real pretrained LLM. SmolLM2-135M-Instruct (Llama
architecture, from the GGUF asset) gets LoRA adapters on ``q_proj``, ``v_proj`` and
``down_proj`` and is fine-tuned on fewer facts and windows (2 cores); ``ekfac / base mlp``
then tracks the frozen ``down_proj`` base weights. ``python -m benchmarks.lora --model smollm2
--facts 10 --chunks 30 --epochs 5 --lr 5e-3 --seeds 1 --report docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.common import ROOT, load_average, write_section
from influscope import FitConfig, Influence, ScoreConfig
from influscope.curvature import IdentityOperator
from influscope.demo.corpus import build_demo_corpus
from influscope.demo.pipeline import direct_fact_queries, planted_top1
from influscope.demo.train import DemoTrainConfig, evaluate_queries, train_demo_model, train_lm
from influscope.modules import FrozenBaseWarning

TARGETS = {"demo": ["c_attn", "c_fc", "c_proj"], "smollm2": ["q_proj", "v_proj", "down_proj"]}
METHODS = ("ekfac / lora", "datainf / lora", "identity / lora", "ekfac / base mlp")
#: Each method plain and RelatIF-normalised (÷ sqrt of the training sequence's self-influence).
NAMES = [name for m in METHODS for name in (m, m + ", RelatIF")]


def base_model(assets: str, out: Path, which: str = "demo"):
    """The demo model of ``projection_agreement.py`` (trained once, cached under ``out``), or
    SmolLM2-135M-Instruct."""
    if which == "smollm2":
        from influscope.assets import smollm2_gguf
        from influscope.loading import load_model

        return load_model(smollm2_gguf(assets))
    saved = out / "model-seed0"
    if not (saved / "config.json").is_file():
        corpus = build_demo_corpus(assets, n_facts=40, n_shakespeare_chunks=300, seed=0)
        train_demo_model(corpus, saved, DemoTrainConfig(seed=0))
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(saved)


def fine_tune(model, tokenizer, records, seed: int, args):
    """LoRA fine-tune (rank ``args.rank``; only adapter weights train), facts repeated 4×."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=TARGETS[args.model],
        fan_in_fan_out=args.model == "demo",  # GPT-2's Conv1D stores (in, out)
    )
    lora = peft.get_peft_model(model, config)
    subset = [i for i, r in enumerate(records) for _ in range(4 if r.get("fact_id") else 1)]
    if args.model == "smollm2":
        return _fine_tune_llm(lora, tokenizer, records, subset, seed, args)
    result = train_lm(
        records,
        tokenizer,
        model.config,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=0.0,
        batch_size=16,
        seed=seed,
        subset=subset,
        init=lora,
    )
    return result.model.eval()


def _fine_tune_llm(model, tokenizer, records, subset, seed: int, args, batch_size: int = 8):
    """AdamW + warm-up/cosine on the mean summed-token loss of the task (any causal LM)."""
    from influscope.optim import adamw_cosine
    from influscope.tasks import CausalLMTask, context_length

    task = CausalLMTask()
    data = task.encode(records, tokenizer, context_length(model), True)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = args.epochs * math.ceil(len(subset) / batch_size)
    optimizer, scheduler = adamw_cosine(params, args.lr, 0.0, steps, max(1, steps // 20), 0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(args.epochs):
        order = [subset[i] for i in torch.randperm(len(subset), generator=generator).tolist()]
        total = 0.0
        for first in range(0, len(order), batch_size):
            batch = task.collate([data.examples[i] for i in order[first : first + batch_size]])
            loss = task.training_loss(model, batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch["input_ids"])
        print(f"epoch {epoch + 1}: mean loss {total / len(order):.3f}", flush=True)
    return model.eval()


def attribute(model, tokenizer, records, queries, base_rank: int | None) -> dict[str, float]:
    """Top-1 hit rate of each method on the fine-tuned model (base-layer queries at
    ``base_rank``; adapter queries at full rank)."""
    out = {}
    for method in METHODS:
        curvature, where = method.split(" / ")
        modules = "lora" if where == "lora" else [r"\.mlp\..*\.base_layer$"]
        rank = None if where == "lora" else base_rank
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FrozenBaseWarning)  # asked for on purpose
            inf = Influence(model, "causal_lm", modules=modules, tokenizer=tokenizer, device="cpu")
        train = inf.encode(records, truncate=True)
        encoded = inf.encode(queries, truncate=True)
        if curvature in ("ekfac", "datainf"):
            op = inf.fit(train, FitConfig(curvature=curvature))
        else:
            op = IdentityOperator({name: 0.0 for name in inf.layer_names})
        for normalize, name in ((None, method), ("relatif", method + ", RelatIF")):
            config = ScoreConfig(query_rank=rank, normalize=normalize)
            hits = planted_top1(inf.score(encoded, train, op, config), train.records, queries)
            out[name] = sum(hits) / len(hits)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["demo", "smollm2"], default="demo")
    p.add_argument("--assets", default=".cache/assets")
    p.add_argument("--out", default="runs/projection", help="Where the base model is cached.")
    p.add_argument("--facts", type=int, default=20, help="New planted facts to fine-tune on.")
    p.add_argument("--chunks", type=int, default=100, help="Shakespeare windows mixed in.")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank.")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--report", default=None, help="Markdown file to write the table into.")
    args = p.parse_args()
    torch.set_num_threads(2)

    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        model, tokenizer = base_model(args.assets, Path(args.out), args.model)
        # New facts (seed ≠ 0: names the base model was not trained on) and Shakespeare windows.
        corpus = build_demo_corpus(
            args.assets, n_facts=args.facts, n_shakespeare_chunks=args.chunks, seed=100 + seed
        )
        records, queries = corpus.records, direct_fact_queries(corpus)
        before = evaluate_queries(model, tokenizer, queries).summary()
        tuned = fine_tune(model, tokenizer, records, seed, args)
        after = evaluate_queries(tuned, tokenizer, queries).summary()
        # full-rank queries over SmolLM2's 1536 × 576 base layers would be large: rank 32 there
        hits = attribute(
            tuned, tokenizer, records, queries, 32 if args.model == "smollm2" else None
        )
        n_lora = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
        row = {
            "seed": seed,
            "n_train": len(records),
            "n_queries": len(queries),
            "lora_parameters": n_lora,
            "greedy_before": before["greedy_match_accuracy"],
            "greedy_after": after["greedy_match_accuracy"],
            "logprob_before": before["mean_logprob"],
            "logprob_after": after["mean_logprob"],
            **hits,
            "seconds": time.perf_counter() - t0,
        }
        print(json.dumps(row))
        rows.append(row)

    def mean(key):
        return sum(r[key] for r in rows) / len(rows)

    def spread(key):
        return max(r[key] for r in rows) - min(r[key] for r in rows)

    first = rows[0]
    if args.model == "demo":
        what = (
            "The demo model (2-layer GPT-2, width 64) fine-tuned with LoRA (rank "
            f"{args.rank}, {first['lora_parameters']:,} adapter weights on every attention and "
            "MLP projection"
        )
        command = "python -m benchmarks.lora --report docs/benchmarks.md"
    else:
        what = (
            "SmolLM2-135M-Instruct (Llama, GGUF asset) fine-tuned with LoRA (rank "
            f"{args.rank}, {first['lora_parameters']:,} adapter weights on q_proj, v_proj and "
            "down_proj of all 30 blocks"
        )
        command = (
            f"python -m benchmarks.lora --model smollm2 --facts {args.facts} --chunks "
            f"{args.chunks} --epochs {args.epochs} --lr {args.lr:g} --report docs/benchmarks.md"
        )
    lines = [
        "## Influence through LoRA adapters" + (" (SmolLM2-135M)" if args.model != "demo" else ""),
        "",
        f"`{command}` (seeds {' '.join(map(str, args.seeds))}; {load_average()} load average "
        "at the end).",
        "",
        f"{what}, base frozen; {args.epochs} epochs, lr {args.lr:g}) on {args.facts} *new* "
        f"planted facts × 3 wordings (each repeated 4× per epoch) plus {args.chunks} "
        f"Shakespeare windows: {first['n_train']} fine-tuning sequences. Query: the fact's "
        "taught wording up to the answer. Hit: the top-ranked fine-tuning sequence states "
        f"that fact (chance {3 / first['n_train']:.3f}). The fine-tune learns the facts: mean "
        f"log p(answer | prompt) {mean('logprob_before'):.1f} before, "
        f"{mean('logprob_after'):.1f} after; greedy recall of the whole answer "
        f"{mean('greedy_before'):.2f} before, {mean('greedy_after'):.2f} after.",
        "",
        "| attribution | top-1 hit rate (mean over seeds) | max − min over seeds |",
        "|---|---|---|",
        *[f"| {m} | {mean(m):.3f} | {spread(m):.3f} |" for m in NAMES],
        "",
        "`ekfac / base mlp` tracks the frozen base MLP weights (`.mlp.*.base_layer`): what the "
        "`mlp` preset gives a LoRA model, and what influscope warns about (FrozenBaseWarning). "
        "`datainf / lora` is DataInf (Kwon et al. 2024): the inverse of each adapter's damped "
        "curvature replaced by the average of per-example Sherman–Morrison inverses. "
        "`, RelatIF`: the same scores divided by the square root of each training sequence's "
        "self-influence (Barshan et al. 2020; with `identity`, a gradient cosine)."
        + (
            " Base-layer queries are rank 32 (full rank elsewhere)." if args.model != "demo" else ""
        ),
    ]
    print("\n".join(lines))
    if args.report:
        key = "lora" if args.model == "demo" else f"lora_{args.model}"
        write_section(ROOT / args.report, key, "\n".join(lines))


if __name__ == "__main__":
    main()
