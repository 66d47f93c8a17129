"""Contrastive queries: ``f = log p(completion | prompt) − log p(contrast | prompt)``.

The measurement is linear in the two rows' gradients, so with any curvature the score of a
contrastive query equals score(completion) − score(contrast) exactly (float64), layer by
layer and token by token; the hooked gradients of a contrastive batch (two model rows per
example) equal a per-example autograd reference.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import hooked
from influscope import FitConfig, Influence, ScoreConfig
from influscope.errors import DataError
from influscope.reference import per_example_gradients
from influscope.tasks import CausalLMTask
from influscope.toy import tiny_gpt2_config
from influscope.training import train_tokenizer

TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Zorin Quell was born in Ostrava.",
    "The river Nim flows through Ardent Fields.",
    "Kelvar Dunn composed Seven Lanterns.",
    "Water boils at one hundred degrees.",
]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_PROMPT = [{"role": "user", "content": "The capital of Velmora?"}]
#: (prompt, completion, contrast) of the queries, string and chat forms.
QUERIES = [
    ("The capital of Velmora is", " Tarsk.", " Ostrava."),
    ("Zorin Quell was born in", " Ostrava.", " the river Nim flows"),
    (CHAT_PROMPT, "Tarsk.", [{"role": "assistant", "content": "Brno, by the sea."}]),
]


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(TEXTS * 4 + ["user assistant"], vocab_size=300, min_frequency=1)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = tiny_gpt2_config(n_embd=16, n_layer=1, vocab_size=len(tok), n_positions=64)
    model = GPT2LMHeadModel(cfg).double().eval()
    inf = Influence(model, "causal_lm", modules="all", tokenizer=tok, device="cpu")
    train = inf.encode([{"text": t} for t in TEXTS])
    return inf, train


def records(which: str) -> list[dict]:
    """The queries with their contrast (``both``), or as plain completion / contrast queries."""
    out = []
    for prompt, completion, contrast in QUERIES:
        if which == "both":
            out.append({"prompt": prompt, "completion": completion, "contrast": contrast})
        else:
            out.append({"prompt": prompt, "completion": completion if which == "c" else contrast})
    return out


@pytest.mark.parametrize("curvature", ["identity", "ekfac"])
def test_contrastive_score_is_completion_minus_contrast(setup, curvature):
    inf, train = setup
    op = inf.fit(train, FitConfig(curvature=curvature))
    cfg = ScoreConfig(query_rank=None, per_layer=True, batch_size=2)
    both, c, k = (inf.score(inf.encode(records(w)), train, op, cfg) for w in ("both", "c", "k"))
    assert both.pairwise.dtype == torch.float64
    assert (both.pairwise - c.pairwise).abs().max() > 1e-3  # the contrast matters
    torch.testing.assert_close(both.pairwise, c.pairwise - k.pairwise, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(both.per_layer, c.per_layer - k.per_layer, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(both.per_layer.sum(-1), both.pairwise, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        both.measurements, c.measurements - k.measurements, rtol=1e-12, atol=1e-12
    )
    # per-token influence of each training sequence sums to its pairwise score
    pq = inf.precondition(inf.encode(records("both")), op, cfg)
    tokens = inf.token_scores(pq, train, op, cfg)
    sums = torch.stack([t.sum(-1) for t in tokens], dim=1)  # (Q, N)
    torch.testing.assert_close(sums, both.pairwise, rtol=1e-9, atol=1e-12)


def test_contrastive_gradients_match_autograd_and_batching(setup):
    inf, _ = setup
    # a query without a contrast in a contrastive set: its contrast row adds exactly 0
    recs = [*records("both"), {"prompt": "The river Nim", "completion": " flows."}]
    data = inf.encode(recs)
    assert set(data.examples[0]) >= {"contrast_ids", "contrast_labels"}
    task, layers = inf.task, inf.layers
    ref = per_example_gradients(inf.model, task, layers, data, "measurement")
    plain = per_example_gradients(inf.model, task, layers, inf.encode(recs[-1:]), "measurement")
    for bs in (1, 3):
        fast = hooked(inf.model, task, layers, data, "measurement", batch_size=bs)
        for layer in layers:
            err = (fast[layer.name] - ref[layer.name]).norm() / ref[layer.name].norm()
            assert err < 1e-10, (layer.name, bs, err)
    for layer in layers:
        torch.testing.assert_close(ref[layer.name][-1:], plain[layer.name], rtol=1e-9, atol=1e-12)
    # a contrast is a measurement: contrastive records as training data are refused
    with pytest.raises(DataError, match=r"'contrast' were used as training data.*drop"):
        task.training_loss(inf.model, task.collate(data.examples[:3]), None)
    with pytest.raises(DataError, match=r"'contrast' were used as training data"):
        inf.fit(data)


def test_contrast_input_errors(setup):
    inf, _ = setup
    with pytest.raises(DataError, match=r"Record 1 has a 'contrast' but keys .*needs 'prompt'"):
        inf.encode([{"text": "Tarsk", "contrast": "Brno"}])
    with pytest.raises(DataError, match=r"Record 1 field 'contrast' is a list but its 'prompt'"):
        inf.encode([{"prompt": "a", "completion": " b", "contrast": CHAT_PROMPT}])
    with pytest.raises(DataError, match=r"Record 1 has a contrast with no tokens"):
        inf.encode([{"prompt": "The capital", "completion": " Tarsk", "contrast": ""}])


def test_contrast_is_an_encoding_of_the_same_prompt(setup):
    inf, _ = setup
    ex = inf.encode(records("both")).examples
    tok = inf.tokenizer
    for e, (prompt, _, contrast) in zip(ex, QUERIES):
        n = int((e["labels"] != -100).nonzero()[0])  # first measured token
        m = int((e["contrast_labels"] != -100).nonzero()[0])
        assert n == m and torch.equal(e["input_ids"][:n], e["contrast_ids"][:m])  # one prompt
        text = contrast if isinstance(contrast, str) else contrast[0]["content"]
        got = tok.decode(e["contrast_ids"][e["contrast_labels"] != -100])
        assert got == (text if isinstance(prompt, str) else text + "<|end|>")
    assert isinstance(CausalLMTask().batch_rows(CausalLMTask().collate(ex)), int)
    assert CausalLMTask().batch_rows(CausalLMTask().collate(ex)) == 2
