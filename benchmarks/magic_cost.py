"""MAGIC's cost as multiples of the training run it differentiates (CPU, approximate).

A randomly initialised GPT-2 (``influscope.toy.tiny_gpt2``: width 32, 2 blocks, vocabulary 64,
float32, eager attention) is fine-tuned with AdamW on ``N`` random sequences of 8–16 tokens,
batch size 4, for ``T`` steps; the script times

* the fine-tune alone (:class:`influscope.metagrad.Finetune` ``.run``),
* MAGIC with ``Q`` queries (forward run with checkpoints + REPLAY + ``Q`` vjps per step),

and prints each MAGIC time as a multiple of the training time, with REPLAY's memory estimate.
Timings on a shared machine are approximate; the ratio is what carries over.

Run:  OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.magic_cost [--n 100 --epochs 8]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

from influscope.metagrad import Finetune, FinetuneConfig, MagicConfig, magic_scores, replay_memory
from influscope.modules.tracked import TrackedModel
from influscope.tasks import CausalLMTask
from influscope.toy import random_lm_data, tiny_gpt2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="Training sequences (default 100).")
    parser.add_argument("--epochs", type=int, default=8, help="Epochs (default 8: T = 200).")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 4], help="Q values.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    model = tiny_gpt2(n_embd=32, n_layer=2, vocab=64, n_positions=32, dtype=dtype)
    train = random_lm_data(args.n, vocab=64, min_len=8, max_len=16, seed=1)
    queries = random_lm_data(
        max(args.queries), vocab=64, min_len=8, max_len=16, seed=2, prompt_len=4
    )
    recipe = FinetuneConfig(epochs=args.epochs, lr=1e-3, batch_size=4, weight_decay=0.01)
    run = Finetune(model, CausalLMTask(), train, recipe)
    params = sum(p.numel() for p in run.theta0)
    start = time.perf_counter()
    run.run(skip_dropped=False)
    train_s = time.perf_counter() - start
    print(
        f"GPT-2 {params} trained parameters ({args.dtype}), N = {args.n}, T = {run.n_steps} "
        f"AdamW steps: fine-tune {train_s:.1f} s"
    )
    tracked = TrackedModel.select(model, CausalLMTask(), "all")
    for q in args.queries:
        config = MagicConfig(recipe=recipe)
        k = config.interval(run.n_steps)
        mib = replay_memory(run.state_bytes(), run.n_steps, k, q, args.n) / 2**20
        start = time.perf_counter()
        magic_scores(tracked, train, queries.subset(range(q)), config)
        s = time.perf_counter() - start
        print(
            f"MAGIC Q = {q}: {s:.1f} s = {s / train_s:.1f}× training, "
            f"k = {k}, "
            f"REPLAY memory ≈ {mib:.2f} MiB"
        )


if __name__ == "__main__":
    main()
