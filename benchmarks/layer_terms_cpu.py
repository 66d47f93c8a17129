"""The layer-term contraction on CPU: ``einsum("qoi,boi->qb")`` vs one matrix product.

``scoring/pairwise.layer_terms`` sums ``-Σ_{o,i} q̃_{qoi} g_{boi}`` for every query and
training sequence. Both forms compute the same numbers; this times them at SmolLM2's MLP shapes
(batch 16 × 96 tokens, 8 queries), one thread::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.layer_terms_cpu
"""

from __future__ import annotations

import time

import torch


def seconds(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.set_num_threads(1)
    n_q, batch, tokens = 8, 16, 96
    for out_dim, in_dim in ((1536, 576), (576, 1536)):  # gate/up, down
        s, a = torch.randn(batch, tokens, out_dim), torch.randn(batch, tokens, in_dim)
        q = torch.randn(n_q, out_dim, in_dim)
        g = torch.bmm(s.transpose(1, 2), a)  # (B, out, in)
        ein = seconds(lambda q=q, g=g: torch.einsum("qoi,boi->qb", q, g))
        mm = seconds(lambda q=q, g=g: q.reshape(n_q, -1) @ g.reshape(batch, -1).t())
        print(f"out {out_dim} in {in_dim}: einsum {ein:.4f} s, matmul {mm:.4f} s, {ein / mm:.0f}×")


if __name__ == "__main__":
    main()
