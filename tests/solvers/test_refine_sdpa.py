"""Refinement through Hugging Face's default fused attention (forward AD needs the math kernel)."""

from __future__ import annotations

import torch

from conftest import random_lm_data, tiny_gpt2
from influscope import FitConfig, Influence, ScoreConfig
from influscope.tasks import CausalLMTask

TASK = CausalLMTask()


def test_refinement_with_sdpa_attention_equals_eager():
    # The fused SDPA kernels have no forward-mode derivative ("Trying to use forward AD with
    # _scaled_dot_product_flash_attention_for_cpu"); the Gauss-Newton product must still run,
    # and give the eager model's result.
    train = random_lm_data(6, vocab=16, min_len=3, max_len=6, seed=1)
    queries = random_lm_data(2, vocab=16, min_len=3, max_len=6, seed=2)
    out = {}
    for impl in ("eager", "sdpa"):
        model = tiny_gpt2(n_embd=8, n_layer=1, vocab=16, n_positions=16)
        model.config._attn_implementation = impl
        inf = Influence(model, TASK, modules="all")
        factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=4))
        cfg = ScoreConfig(query_rank=None, refine_steps=2)
        out[impl] = inf.score(queries, train, factors, cfg).pairwise
    assert out["sdpa"].abs().max() > 0
    torch.testing.assert_close(out["sdpa"], out["eager"], rtol=1e-8, atol=1e-10)
