"""Overhead of training-time collection on the demo training (issue 15, item 2).

Trains the demo model (:func:`influscope.demo.train.train_demo_model`'s corpus, tokenizer,
model size, AdamW schedule and batches) several times in one process, interleaving the modes so
that machine load affects all of them alike, and reports the median wall time of each mode and
its ratio to training without collection (and the same for the process's CPU time, which
is less sensitive to other jobs on a shared machine):

* ``none`` — the plain loop, no collector attached;
* ``checkpoints`` — :class:`~influscope.collect.GradientCollector` saving a checkpoint every
  ``--checkpoint-every`` steps;
* ``gradients`` — projected per-example gradients (``k × k`` per tracked layer, MLP layers) of
  every example in every step, with the verification on (the default);
* ``gradients-noverify`` — the same without the verification;

and, with ``--trainer``, the same modes through ``transformers.Trainer`` with and without
:class:`~influscope.collect.InfluenceCallback` (``trainer-none``, ``trainer-checkpoints``,
``trainer-gradients``). The plain loop is the demo's own ``train_lm`` loop, step for step; the
script checks that collecting leaves the trained weights bit-identical.

    python -m benchmarks.collect_overhead --assets .cache/assets --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from influscope.collect import CollectConfig, GradientCollector, InfluenceCallback
from influscope.demo.corpus import build_demo_corpus
from influscope.demo.train import DemoTrainConfig
from influscope.optim import adamw_cosine
from influscope.training import (
    _batch,
    _encode,
    fixed_threads,
    make_gpt2_config,
    sequence_losses,
    train_tokenizer,
)


def plain_loop(seqs, tokenizer, config, settings, out: Path | None, collect: CollectConfig | None):
    """``train_lm``'s loop (same seed, batches, optimizer), optionally with a collector."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(settings.seed)
    model = GPT2LMHeadModel(config).train()
    total = settings.epochs * math.ceil(len(seqs) / settings.batch_size)
    optimizer, scheduler = adamw_cosine(
        model.parameters(), settings.lr, settings.weight_decay, total, max(1, int(0.05 * total)),
        floor=0.1,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(settings.seed)
    collector = GradientCollector(model, out, collect) if collect is not None else None
    if collector is not None:
        collector.attach()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(settings.epochs):
        order = torch.randperm(len(seqs), generator=generator).tolist()
        for first in range(0, len(order), settings.batch_size):
            idx = order[first : first + settings.batch_size]
            input_ids, labels = _batch([seqs[i] for i in idx], tokenizer.pad_token_id)
            if collector is not None:
                collector.begin(idx, lr=optimizer.param_groups[0]["lr"])
            losses = sequence_losses(model, input_ids, labels)  # (B,)
            optimizer.zero_grad(set_to_none=True)
            if collector is not None:
                collector.backward(losses)
            else:
                losses.mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if collector is not None:
                collector.end()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if collector is not None:
        collector.detach()
    return seconds, cpu, model


def trainer_loop(seqs, tokenizer, config, settings, out: Path, collect: CollectConfig | None):
    """The same data and schedule through ``transformers.Trainer``."""
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(settings.seed)
    model = GPT2LMHeadModel(config)
    data = [{"ids": s, "example_index": i} for i, s in enumerate(seqs)]

    def collate(features):
        input_ids, labels = _batch([f["ids"] for f in features], tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": labels.ne(-100).long(), "labels": labels}

    def plain_collate(features):
        return collate([{k: v for k, v in x.items() if k != "example_index"} for x in features])

    callbacks, collator = [], plain_collate
    if collect is not None:
        callback = InfluenceCallback(out, collect)
        callbacks, collator = [callback], callback.collator(collate)
    args = TrainingArguments(
        output_dir=str(out / "hf"), num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size, learning_rate=settings.lr,
        weight_decay=settings.weight_decay, lr_scheduler_type="cosine", warmup_steps=0.05,
        max_grad_norm=1.0, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", remove_unused_columns=False, seed=settings.seed,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks
    )
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    return time.perf_counter() - start, time.process_time() - cpu, model


MODES = {
    "none": ("plain", None),
    "checkpoints": ("plain", "checkpoints"),
    "gradients": ("plain", "gradients"),
    "gradients-noverify": ("plain", "gradients-noverify"),
    "trainer-none": ("trainer", None),
    "trainer-checkpoints": ("trainer", "checkpoints"),
    "trainer-gradients": ("trainer", "gradients"),
}


def collect_config(kind: str | None, args) -> CollectConfig | None:
    if kind is None:
        return None
    if kind == "checkpoints":
        return CollectConfig(gradients=False, checkpoint_every=args.checkpoint_every)
    return CollectConfig(
        k_in=args.k, k_out=args.k, gradient_every=1, verify=kind == "gradients",
        dtype="float32",
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=None, help="asset cache (make assets)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (median reported)")
    parser.add_argument("--epochs", type=int, default=DemoTrainConfig().epochs, help="epochs")
    parser.add_argument("--k", type=int, default=16, help="k_in = k_out of the projections")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint interval")
    parser.add_argument(
        "--modes", nargs="+", default=["none", "checkpoints", "gradients", "gradients-noverify"],
        choices=sorted(MODES), help="modes to time",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    settings = DemoTrainConfig(epochs=args.epochs)
    corpus = build_demo_corpus(args.assets, 40, 300, seed=settings.seed)
    tokenizer = train_tokenizer(corpus.texts, settings.vocab_size)
    config = make_gpt2_config(tokenizer, n_layer=settings.n_layer, n_embd=settings.n_embd,
                              n_head=settings.n_head, n_positions=settings.n_positions)  # fmt: skip
    subset = [
        i
        for i, r in enumerate(corpus.records)
        for _ in range(settings.fact_repeats if r.get("fact_id") else 1)
    ]
    seqs = _encode([corpus.records[i] for i in subset], tokenizer, config.n_positions)
    steps = settings.epochs * math.ceil(len(seqs) / settings.batch_size)
    times: dict[str, list[float]] = {m: [] for m in args.modes}
    cpus: dict[str, list[float]] = {m: [] for m in args.modes}
    disk: dict[str, int] = {}
    weights: dict[str, torch.Tensor] = {}
    with fixed_threads(args.threads):
        for rep in range(args.repeats):
            for mode in args.modes:
                loop, kind = MODES[mode]
                out = Path(tempfile.mkdtemp(prefix="collect-bench-"))
                try:
                    fn = plain_loop if loop == "plain" else trainer_loop
                    seconds, cpu, model = fn(
                        seqs, tokenizer, config, settings, out, collect_config(kind, args)
                    )
                    disk[mode] = sum(
                        p.stat().st_size
                        for p in out.rglob("*")
                        if p.is_file() and "hf" not in p.parts
                    )
                    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
                    if loop == "plain":
                        weights.setdefault("plain", flat)
                        if not torch.equal(weights["plain"], flat):
                            raise SystemExit(f"{mode}: collection changed the trained weights")
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                times[mode].append(seconds)
                cpus[mode].append(cpu)
                print(
                    f"rep {rep + 1} {mode:20s} {seconds:7.2f} s wall {cpu:7.2f} s CPU", flush=True
                )
    rows = []
    for mode in args.modes:
        base = "trainer-none" if mode.startswith("trainer") else "none"
        row = {"mode": mode, "disk_mb": disk[mode] / 2**20}
        for key, series in (("wall", times), ("cpu", cpus)):
            med = statistics.median(series[mode])
            ref = statistics.median(series[base]) if base in series else float("nan")
            row.update(
                {f"{key}_median_s": med, f"{key}_runs_s": series[mode], f"{key}_ratio": med / ref}
            )
        rows.append(row)
    print(
        f"\n{steps} steps × {settings.batch_size} sequences, k={args.k}, "
        f"checkpoint every {args.checkpoint_every} steps, threads={args.threads}, "
        f"{args.repeats} repeats"
    )
    print(
        "| mode | wall median (s) | wall runs (s) | wall ratio | CPU median (s) | CPU ratio "
        "| written (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        runs = ", ".join(f"{t:.1f}" for t in r["wall_runs_s"])
        print(
            f"| {r['mode']} | {r['wall_median_s']:.1f} | {runs} | {r['wall_ratio']:.3f} | "
            f"{r['cpu_median_s']:.1f} | {r['cpu_ratio']:.3f} | {r['disk_mb']:.1f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"steps": steps, "k": args.k, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
