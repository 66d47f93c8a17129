"""Where ``score --refine`` spends time and memory on SmolLM2-135M (issue 23).

The first-hour setting of docs/benchmarks.md (40 one-line documents × 4 queries, 90 MLP
projections, EK-FAC fitted by ``influscope fit``). Loads the model and the fitted factors of
``--run`` and times, one after the other, with the resident set size after each:

* the block's query gradients and their ``P^{-1}`` images, flat (:func:`_block_gradients`;
  the figures in docs/benchmarks.md came from the version before it wrote them flat);
* one EK-FAC preconditioning ``P^{-1} r`` of one query vector (``apply_p``);
* one damped Gauss-Newton product over all training sequences for 1 vector and for
  ``Q`` vectors at once (one forward per mini-batch, the tangents vmapped);
* the scoring pass over the training data (``score_pass``) with the plain queries.

    OMP_NUM_THREADS=2 python -m benchmarks.refine_cost --model M.gguf --train train.jsonl \
        --queries queries.jsonl --run RUN
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import psutil
import torch

from influscope import Influence, ScoreConfig
from influscope.loading import load_model, load_records
from influscope.modules.selection import default_modules
from influscope.scoring.damping import score_damping
from influscope.scoring.pairwise import score_pass
from influscope.scoring.queries import _block_gradients, precondition_queries
from influscope.solvers import GaussNewtonProduct
from influscope.tasks import CausalLMTask


class Peak:
    """Samples the RSS every 20 ms; ``peak()`` since the last ``reset()`` in GiB."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.top = 0
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop:
            self.top = max(self.top, self.proc.memory_info().rss)
            time.sleep(0.02)

    def reset(self) -> None:
        self.top = self.proc.memory_info().rss

    def now(self) -> float:
        return self.proc.memory_info().rss / 2**30

    def peak(self) -> float:
        return max(self.top, self.proc.memory_info().rss) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--queries", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--budget-gb", type=float, default=2.0, help="product tangent budget (GiB)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    peak = Peak()

    def mark(what: str, began: float) -> None:
        print(
            f"{what:<48} {time.perf_counter() - began:8.2f} s   RSS {peak.now():6.2f} GiB"
            f"   peak {peak.peak():6.2f} GiB",
            flush=True,
        )
        peak.reset()

    t = time.perf_counter()
    model, tokenizer = load_model(args.model, "causal_lm")
    inf = Influence(
        model,
        CausalLMTask(chat_loss="assistant"),  # as the CLI builds it
        modules=default_modules(model),
        tokenizer=tokenizer,
        run_dir=args.run,
    )
    train = inf.encode(load_records(args.train))
    queries = inf.encode(load_records(args.queries))
    mark("model loaded, data encoded", t)
    t = time.perf_counter()
    op = score_damping(inf.load_factors(train, "factors"), ScoreConfig())
    mark("factors loaded", t)
    layers = list(inf.tracked.layers)
    names = [layer.name for layer in layers]
    config = ScoreConfig(query_rank=32, refine_steps=2)

    t = time.perf_counter()
    b, x, _, _ = _block_gradients(model, inf.tracked.task, layers, op, queries, config)  # (Q, P)
    mark(f"query gradients + P^-1 (flat, {len(queries)} queries)", t)

    product = GaussNewtonProduct(
        model, inf.tracked.task, layers, op.damping, 8, memory_budget=args.budget_gb * 2**30
    )

    t = time.perf_counter()
    parts = product.unflatten(x[:1])
    product.flatten({n: op.precondition(n, parts[n]) for n in names})
    mark("apply_p, 1 query", t)
    t = time.perf_counter()
    parts = product.unflatten(x)
    product.flatten({n: op.precondition(n, parts[n]) for n in names})
    mark(f"apply_p, {len(queries)} queries", t)

    t = time.perf_counter()
    product.damped(x[:1], train)
    mark("damped product, 1 vector, all sequences", t)
    t = time.perf_counter()
    product.damped(x, train)
    mark(f"damped product, {x.shape[0]} vectors in one pass", t)
    del b, x

    t = time.perf_counter()
    pq = precondition_queries(inf.tracked, op, queries, ScoreConfig(query_rank=32))
    mark("plain query gradients (rank 32)", t)
    t = time.perf_counter()
    score_pass(inf.tracked, pq, train, ScoreConfig(query_rank=32, per_layer=True), op, False)
    mark("scoring pass (per layer)", t)
    peak.stop = True


if __name__ == "__main__":
    main()
