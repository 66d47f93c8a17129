"""Regressions found by using the Python API as a new user: misuse gets a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_lm_data, tiny_gpt2, tiny_reward_model
from influscope import (
    ConfigError,
    DataError,
    EncodedDataset,
    Influence,
    Scores,
)


def test_scores_top_validates_query_and_k():
    scores = Scores(torch.tensor([[0.5, -1.0, 2.0]]), ["layer"], [0, 1, 2])
    assert scores.top(0, k=10) == [(2, 2.0), (0, 0.5), (1, -1.0)]  # k > N: all of them
    assert scores.top(np.int64(0), k=np.int64(1)) == [(2, 2.0)]  # NumPy integers work
    assert scores.top(0, k=0) == []
    with pytest.raises(ConfigError, match=r"k must be an integer ≥ 0, received -1"):
        scores.top(0, k=-1)
    with pytest.raises(ConfigError, match=r"0 ≤ query < 1; received 3.*1 queries"):
        scores.top(3)


class CharTokenizer:
    """Minimal tokenizer: one id per character (no downloads)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        if not isinstance(text, str):
            raise ValueError("text input must be of type `str`")  # what HF tokenizers say
        return {"input_ids": [2 + (ord(c) % 30) for c in text]}


TRAIN = [{"text": "the capital of velmora is tarsk"}, {"text": "to be or not to be"}]
QUERY = [{"prompt": "the capital of velmora is", "completion": " tarsk"}]


def _inf(**kw) -> Influence:
    return Influence(tiny_gpt2(), "causal_lm", tokenizer=CharTokenizer(), **kw)


def test_records_of_the_wrong_shape_say_what_to_pass():
    inf = _inf()
    with pytest.raises(DataError, match=r"Record 1 is a str.*\[\{'text': s\} for s in texts\]"):
        inf.encode(["hello world"])  # listed its characters as "keys" before
    with pytest.raises(DataError, match=r"received a single dict. Wrap it in a list"):
        inf.encode({"text": "hello"})  # a TypeError before
    with pytest.raises(DataError, match="received a string"):
        inf.encode("hello")
    with pytest.raises(DataError, match=r"Record 2 field 'text' must be a string, received int"):
        inf.encode([{"text": "ok"}, {"text": 5}])  # the tokenizer's ValueError before
    with pytest.raises(DataError, match="field 'completion' must be a string, received NoneType"):
        inf.encode([{"prompt": "a", "completion": None}])
    # Any iterable of dicts works (a Hugging Face `datasets.Dataset` yields dicts).
    assert len(inf.encode(iter(TRAIN))) == 2
    with pytest.raises(DataError, match=r"tokenizer=.*AutoTokenizer"):
        Influence(tiny_gpt2()).encode(TRAIN)


def test_methods_accept_records_and_check_their_arguments():
    inf = _inf()
    factors = inf.fit(TRAIN)  # records are encoded on the way (an AttributeError before)
    scores = inf.score(QUERY, TRAIN, factors)
    encoded = inf.score(inf.encode(QUERY), inf.encode(TRAIN), factors)
    assert torch.equal(scores.pairwise, encoded.pairwise)
    assert [t.shape[-1] for t in inf.token_scores(QUERY, TRAIN, factors)] == [32, 19]
    with pytest.raises(ConfigError, match=r"config must be a FitConfig.*received str 'ekfac'"):
        inf.fit(TRAIN, "ekfac")
    with pytest.raises(ConfigError, match="config must be a ScoreConfig"):
        inf.score(QUERY, TRAIN, factors, {"query_rank": 8})
    with pytest.raises(ConfigError, match=r"factors must be the curvature operator.*NoneType"):
        inf.score(QUERY, TRAIN, None)
    wider = Influence(inf.model, tokenizer=CharTokenizer(), modules="all")
    with pytest.raises(ConfigError, match=r"also tracks \['transformer\.h\.0\.attn\.c_attn'"):
        wider.score(QUERY, TRAIN, factors)  # a KeyError deep in the operator before
    with pytest.raises(DataError, match="no run directory: create it with run_dir"):
        inf.load_factors(TRAIN)


def test_a_task_that_does_not_fit_the_model_is_named():
    """Wrong task for the model: a shape error inside cross_entropy before."""
    with pytest.raises(ConfigError, match=r"expects model logits of shape \(batch, classes\)"):
        Influence(tiny_gpt2(), "classification").fit(
            EncodedDataset(
                [
                    {
                        "input_ids": torch.tensor([3, 4]),
                        "attention_mask": torch.ones(2, dtype=torch.long),
                        "labels": torch.tensor(0),
                    }
                ]
            )
        )
    clf = tiny_reward_model()  # a sequence classifier with one label
    with pytest.raises(ConfigError, match=r"task='classification' or 'reward'"):
        Influence(clf, "causal_lm").fit(random_lm_data(2))


def test_report_tokens_keep_non_ascii_characters():
    """Byte-level BPE splits 'é', '日' and emoji over several tokens; decoding each token alone
    put U+FFFD replacement characters into the report instead of the text."""
    from influscope.demo.train import train_tokenizer
    from influscope.report.build import decode_tokens

    tok = train_tokenizer(["the capital of velmora is tarsk"] * 4, vocab_size=300)
    text = "Café — 日本語 🎭 <b>&</b>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters do span several tokens
    pieces = decode_tokens(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_truncate_keeps_the_completion_of_a_long_prompt():
    """--truncate cut prompt+completion at the right, so a long prompt lost its completion
    and the record was refused ('no token to predict')."""
    inf = Influence(tiny_gpt2(n_positions=16), tokenizer=CharTokenizer())
    tok = CharTokenizer()
    (ex,) = inf.encode([{"prompt": "abcdefghij" * 4, "completion": "xyz"}], truncate=True).examples
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    expected = [1, *tok("abcdefghij" * 4)["input_ids"][-12:], *tok("xyz")["input_ids"]]
    assert ids == expected  # BOS, the prompt's last 12 tokens, the whole completion
    assert labels == [-100] * 13 + tok("xyz")["input_ids"]
    (text,) = inf.encode([{"text": "abcdefghij" * 4}], truncate=True).examples
    assert text["input_ids"].tolist() == [1, *tok("abcdefghij" * 4)["input_ids"][:15]]


def test_retrieve_refuses_an_index_of_other_training_data(tmp_path):
    """`influscope query --train OTHER` mapped index rows onto the wrong records (or raised an
    IndexError when OTHER was shorter)."""
    from influscope import StaleArtifactError
    from influscope.index import IndexConfig, build_index
    from influscope.index.retrieve import retrieve

    inf = Influence(tiny_gpt2(), "causal_lm")
    train, queries = random_lm_data(6, seed=1), random_lm_data(1, seed=2, prompt_len=3)
    cfg = IndexConfig(k_in=4, k_out=4, dtype="float32", batch_size=4)
    index = build_index(inf.tracked, train, tmp_path / "idx", cfg)
    assert len(retrieve(inf, queries, train, index=index, top_k=2).indices[0]) == 2
    with pytest.raises(StaleArtifactError, match=r"built from other training data \(6 seq"):
        retrieve(inf, queries, train.subset([0, 1, 2]), index=index, top_k=2)


def test_records_files_may_start_with_a_byte_order_mark(tmp_path):
    """Files saved by Windows tools start with a UTF-8 BOM; json refused the first line."""
    from influscope.loading import load_records

    for name, body in [
        ("a.jsonl", '{"text": "first"}\n{"text": "second"}\n'),
        ("a.json", '[{"text": "first"}, {"text": "second"}]'),
        ("a.txt", "first\n\nsecond\n"),
    ]:
        (tmp_path / name).write_text("\ufeff" + body, encoding="utf-8")
        assert load_records(tmp_path / name) == [{"text": "first"}, {"text": "second"}]
