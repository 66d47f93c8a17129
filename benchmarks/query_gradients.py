"""Where the ``query gradients`` step of ``score`` spends its time on SmolLM2-135M.

Setting: SmolLM2-135M-Instruct (``make assets``), its 90 MLP layers (576 ↔ 1536), ``--queries``
(default: four one-line prompt → completion pairs), ``query_rank=32``, ``query_svd="auto"``
(randomized here). The EK-FAC operator has random orthogonal bases and eigenvalues of the
real shapes: the cost of preconditioning does not depend on their values, and no fit is needed.
Measured: one forward + backward over the queries alone; :func:`precondition_queries` (token
rows rotated into the eigenbasis); the same step with the gradient formed and rotated
(``precondition_low_rank(name, lb.gradient())``, the route before issue 23); and a cProfile of
the first, by internal time.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.query_gradients [--queries q.jsonl]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch

from influscope import Influence, ScoreConfig
from influscope.assets import smollm2_gguf
from influscope.curvature.ekfac import EKFACOperator
from influscope.loading import load_model, load_records
from influscope.modules.passes import layer_passes
from influscope.scoring.queries import precondition_queries

QUERIES = [
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": "The cat sleeps near", "completion": " the quiet garden."},
    {"prompt": "The library houses", "completion": " ten thousand books."},
    {"prompt": "A storm hits", "completion": " the coast at night."},
]


def random_operator(layers) -> EKFACOperator:
    """EK-FAC with one random orthogonal basis per width and random eigenvalues."""
    gen = torch.Generator().manual_seed(0)
    bases: dict[int, torch.Tensor] = {}

    def basis(d: int) -> torch.Tensor:
        if d not in bases:
            bases[d] = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].double()
        return bases[d]

    names = [layer.name for layer in layers]
    return EKFACOperator(
        {layer.name: basis(layer.in_dim) for layer in layers},
        {layer.name: basis(layer.out_dim) for layer in layers},
        {
            layer.name: torch.rand(layer.out_dim, layer.in_dim, generator=gen, dtype=torch.float64)
            for layer in layers
        },
        dict.fromkeys(names, 0.1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", default=None, help="Query records (default: four pairs).")
    args = parser.parse_args()
    os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")
    model, tok = load_model(smollm2_gguf())
    inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tok, device="cpu")
    queries = inf.encode(load_records(args.queries) if args.queries else QUERIES)
    op = random_operator(inf.layers)
    config = ScoreConfig()
    start = time.perf_counter()
    for _ in layer_passes(
        inf.model, inf.task, inf.layers, queries, batch_size=8, objective="measurement"
    ):
        pass
    forward_backward = time.perf_counter() - start
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    precondition_queries(inf.tracked, op, queries, config)
    profile.disable()
    new = time.perf_counter() - start
    start = time.perf_counter()
    for _, grads, _ in layer_passes(
        inf.model, inf.task, inf.layers, queries, batch_size=8, objective="measurement"
    ):
        for name, lb in grads.items():
            op.precondition_low_rank(name, lb.gradient(), config.query_rank, config.query_svd)
    old = time.perf_counter() - start
    print(
        f"{len(queries)} queries, {queries.max_length()} tokens, {len(inf.layers)} layers: "
        f"forward + backward {forward_backward:.1f} s; query gradients {new:.1f} s "
        f"(gradient route {old:.1f} s); load average {os.getloadavg()}"
    )
    pstats.Stats(profile).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
