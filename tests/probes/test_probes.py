"""Generalisation probes on tiny models: each test can fail if the probe is wrong."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from influscope.errors import ConfigError, DataError, RegistryError
from influscope.probes import (
    PROBES,
    CopyTaskConfig,
    IdOodConfig,
    InfluenceSide,
    PromptingConfig,
    RepresentationConfig,
    block_influence_share,
    build_prompts,
    copy_records,
    get_probe,
    id_ood_probe,
    length_probe,
    linear_probe_accuracy,
    prompting_probe,
    representation_probe,
    train_copy_model,
)
from influscope.probes.length import copy_tokenizer


def _tiny_gpt2(tokenizer, n_positions=32, seed=0):
    from transformers import GPT2LMHeadModel

    from influscope.demo.train import make_gpt2_config

    torch.manual_seed(seed)
    config = make_gpt2_config(tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=n_positions)
    return GPT2LMHeadModel(config).eval()


# --- registry ------------------------------------------------------------------------------
def test_registry_lists_every_probe():
    assert set(PROBES) == {"id_ood", "length", "prompting", "representation"}
    assert get_probe("id-ood") is id_ood_probe
    with pytest.raises(RegistryError, match=r"Unknown probe 'nope'\. Supported: \('id_ood'"):
        get_probe("nope")


# --- representation -----------------------------------------------------------------------
def test_present_token_is_decodable_random_labels_stay_at_chance():
    tok = copy_tokenizer(10)
    model = _tiny_gpt2(tok)
    rng = random.Random(0)
    records = []
    for i in range(240):
        has = i % 2 == 0
        pool = list("abcdefghij") if has else list("bcdefghij")
        body = [rng.choice(pool) for _ in range(6)]
        if has and "a" not in body:
            body[rng.randrange(6)] = "a"
        records.append({"text": " ".join(body), "has_a": has, "random": rng.random() < 0.5})
    result = representation_probe(
        model, tok, records, ["has_a", "random"], RepresentationConfig(folds=4)
    )
    assert result.n_layers == 3  # embeddings + 2 blocks
    assert result.accuracy["has_a"][0] > 0.9  # present in the input: decodable
    assert max(result.control["has_a"]) < 0.65  # same features, permuted labels
    assert max(result.accuracy["random"]) < 0.65  # a property nothing encodes
    assert result.chance["has_a"] == pytest.approx(0.5)
    assert "| embeddings |" in result.markdown() and "<polyline" in result.svg()


def test_linear_probe_refuses_labels_it_cannot_use():
    x = np.zeros((10, 3))
    with pytest.raises(DataError, match="at least 2 label values"):
        linear_probe_accuracy(x, [1] * 10)
    with pytest.raises(DataError, match=r"at least folds=5 texts"):
        linear_probe_accuracy(x, [0] * 8 + [1] * 2)
    with pytest.raises(ConfigError, match="Invalid pool"):
        RepresentationConfig(pool="max")


def test_block_share_sums_the_layers_of_each_block():
    names = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc"]
    share = block_influence_share(names, np.array([[0.2, 0.3, 0.5], [0.4, 0.2, 0.4]]))
    assert share == pytest.approx({0: 0.55, 1: 0.45})


# --- length ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def copy_model():
    config = CopyTaskConfig(train_max_length=4, eval_max_length=16, n_train=1200, epochs=5)
    model, tok, train = train_copy_model(config)
    return model, tok, train, config


def test_model_trained_to_length_l_degrades_past_it(copy_model):
    model, tok, _, config = copy_model
    records = copy_records(range(1, 17), 12, config.n_symbols, seed=123)
    result = length_probe(model, tok, records, config.train_max_length)
    assert result.lengths == list(range(1, 17))  # up to 4L
    assert result.accuracy_within() > 0.6
    assert result.accuracy_beyond(2.0) < 0.1
    within = np.mean(result.loss[: config.train_max_length])
    assert min(result.loss[2 * config.train_max_length :]) > 3 * within
    assert "<polyline" in result.svg() and "| 16 | 4 |" in result.markdown()
    section = result.to_section()  # a section of the studies report
    assert section.title == "Length generalisation"
    assert "<th>accuracy</th>" in section.html and "<td>16</td>" in section.html


def test_length_beyond_context_is_a_clear_error(copy_model):
    model, tok, _, config = copy_model
    records = copy_records([4, 20], 2, config.n_symbols)
    with pytest.raises(
        DataError, match=r"Length 20 needs 41 tokens, beyond .* context of 34.*up to 4"
    ):
        length_probe(model, tok, records, config.train_max_length)
    with pytest.raises(DataError, match="no integer 'length'"):
        length_probe(model, tok, [{"prompt": "a |", "completion": " a"}], 4)


# --- prompting ------------------------------------------------------------------------------
class _StubLM(nn.Module):
    """Predicts ``yes`` (logit log 3, others 0) once the input holds ``need`` separators, else ``no``."""

    def __init__(self, vocab: int, yes: int, no: int, sep: int, need: int = 0) -> None:
        super().__init__()
        self.config = SimpleNamespace(n_positions=64)
        self.vocab, self.yes, self.no, self.sep, self.need = vocab, yes, no, sep, need
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **_):
        seps = (input_ids == self.sep).cumsum(1)  # (B, T)
        target = torch.where(seps >= self.need, self.yes, self.no)  # (B, T)
        logits = torch.zeros(*input_ids.shape, self.vocab)  # (B, T, V)
        logits.scatter_(2, target[..., None], math.log(3.0))
        return SimpleNamespace(logits=logits)


def _yes_no():
    tok = copy_tokenizer(10)
    ids = {s: tok.convert_tokens_to_ids(s) for s in ("a", "b", "|")}
    queries = [
        {"prompt": f"{c} c", "completion": f" {a}", "fact_id": i}
        for i, (c, a) in enumerate([("d", "a"), ("e", "a"), ("f", "a"), ("g", "b")])
    ]
    demos = [
        {"prompt": f"{c} c", "completion": " a", "fact_id": 10 + i} for i, c in enumerate("hijhij")
    ]
    return tok, ids, queries, demos


def test_kshot_accuracy_is_exact_on_a_constructed_example():
    tok, ids, queries, demos = _yes_no()
    vocab = len(tok)
    config = PromptingConfig(ks=(0, 1, 2, 4), separator=" | ", group_key=None)
    always_yes = _StubLM(vocab, ids["a"], ids["b"], ids["|"], need=0)
    res = prompting_probe(always_yes, tok, queries, demos, config)
    p_yes = math.log(3 / (3 + vocab - 1))
    p_no = math.log(1 / (3 + vocab - 1))
    assert res.accuracy["plain"] == [0.75] * 4
    assert res.mean_logprob["plain"] == pytest.approx([(3 * p_yes + p_no) / 4] * 4)
    # "yes" only once two separators (= two demonstrations) precede the answer.
    after_two = _StubLM(vocab, ids["a"], ids["b"], ids["|"], need=2)
    res = prompting_probe(after_two, tok, queries, demos, config)
    assert res.accuracy["plain"] == [0.25, 0.25, 0.75, 0.75]
    shots = build_prompts(queries, demos, 2, config)
    assert shots[0]["prompt"].count(" | ") == 2 and shots[0]["prompt"].endswith("d c")


def test_cot_prefix_arm_and_demonstration_exclusion():
    tok, ids, queries, demos = _yes_no()
    config = PromptingConfig(ks=(0, 1), separator=" | ", cot_prefix="j j |", group_key=None)
    stub = _StubLM(len(tok), ids["a"], ids["b"], ids["|"], need=1)
    res = prompting_probe(stub, tok, queries, demos, config)
    assert res.accuracy == {"plain": [0.25, 0.75], "cot": [0.75, 0.75]}
    same = [dict(d, fact_id=0) for d in demos]  # every demonstration shares query 0's fact
    with pytest.raises(ConfigError, match=r"k=1 needs 1 demonstrations, but query 0 has only 0"):
        build_prompts(queries, same, 1, config)


def test_k_larger_than_the_demonstrations_is_a_clear_error():
    tok, ids, queries, demos = _yes_no()
    stub = _StubLM(len(tok), ids["a"], ids["b"], ids["|"])
    with pytest.raises(ConfigError, match=r"k=8 needs 8 demonstrations, but query 0 has only 6"):
        prompting_probe(stub, tok, queries, demos, PromptingConfig(ks=(0, 8)))
    long_demos = [
        {"prompt": " ".join("c" * 30), "completion": " a", "fact_id": 99 + i} for i in range(3)
    ]
    with pytest.raises(DataError, match=r"The 2-shot prompts .* beyond the model's context of 64"):
        prompting_probe(stub, tok, queries, long_demos, PromptingConfig(ks=(0, 1, 2)))
    with pytest.raises(ConfigError, match="strictly increasing"):
        PromptingConfig(ks=(2, 1))


# --- ID vs OOD ------------------------------------------------------------------------------
def test_eval_set_with_no_overlap_in_format_is_a_clear_error():
    tok = copy_tokenizer(10)
    model = _tiny_gpt2(tok)
    train = [{"text": "a b | a b", "domain": "x"}, {"text": "c d | c d", "domain": "y"}]
    with pytest.raises(DataError, match=r"no overlap in format.*keys \['question'\]"):
        id_ood_probe(model, tok, train, {"odd": [{"question": "a b"}]})
    with pytest.raises(DataError, match=r"no overlap in format.*none of its 1 distinct tokens"):
        id_ood_probe(model, tok, train, {"foreign": [{"text": "x y z"}]})
    with pytest.raises(DataError, match="have no 'domain'"):
        id_ood_probe(model, tok, [{"text": "a b"}], {"s": [{"text": "a b"}]})


def test_ood_examples_draw_influence_from_their_nearest_domain():
    """Two domains over disjoint alphabets; held-out examples of each are nearest to their own
    domain and draw their top influences from it far above its share of the training set."""
    from influscope.demo.train import make_gpt2_config, train_lm

    tok = copy_tokenizer(10)
    rng = random.Random(0)

    def strings(alphabet, n, domain):
        out = []
        for _ in range(n):
            body = " ".join(rng.choice(alphabet) for _ in range(rng.randint(2, 4)))
            out.append({"text": f"{body} | {body}", "domain": domain})
        return out

    train = strings("abcde", 90, "low") + strings("fghij", 30, "high")
    config = make_gpt2_config(tok, n_layer=2, n_embd=32, n_head=2, n_positions=16)
    model = train_lm(
        train, tok, config, epochs=4, lr=3e-3, weight_decay=0.0, batch_size=16, seed=0
    ).model
    side = InfluenceSide(model, tok, train, query_rank=None)
    evals = {
        "held-out low": strings("abcde", 12, "low"),
        "held-out high": strings("fghij", 12, "high"),
    }
    res = id_ood_probe(model, tok, train, evals, IdOodConfig(top_k=5, folds=3), influence=side)
    assert res.nearest_domain == ["low", "high"]
    assert res.domains == {"high": 30, "low": 90}
    high = res.sets.index("held-out high")
    assert res.base_rate[high] == pytest.approx(0.25)
    assert res.topk_from_nearest[high] > 0.6  # vs 0.25 for a random ranking
    assert min(res.top1_from_nearest) > 0.6
    assert all(0 <= a <= 1 for a in res.domain_auc)
    assert "| held-out high |" in res.markdown()
    assert res.top1_domains[high]["high"] == pytest.approx(res.top1_from_nearest[high])
    side.normalize = "relatif"  # RelatIF ranking: still from the nearest domain
    rel = id_ood_probe(model, tok, train, evals, IdOodConfig(top_k=5, folds=3), influence=side)
    assert min(rel.top1_from_nearest) > 0.6


# --- CLI ------------------------------------------------------------------------------------
def test_probe_cli_explains_every_option():
    from influscope.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    probe = sub.choices["probe"]
    inner = next(a for a in probe._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(inner.choices) == {"id-ood", "length", "prompting", "representation"}
    for name, p in inner.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"probe {name} --{action.dest} has no help"
        assert p.format_help()


def test_probe_cli_runs_length_and_representation(copy_model, tmp_path, capsys):
    import json

    from influscope.cli import main

    model, tok, _, config = copy_model
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "lengths.jsonl"
    records = copy_records([2, 12], 4, config.n_symbols, seed=5)
    data.write_text("\n".join(json.dumps(r) for r in records))
    out, svg = tmp_path / "length.json", tmp_path / "length.svg"
    argv = ["probe", "length", "--model", str(tmp_path / "model"), "--data", str(data)]
    run = tmp_path / "run"
    extra = ["--out", str(out), "--svg", str(svg), "--run", str(run)]
    assert main([*argv, "--train-length", "4", *extra]) == 0
    result = json.loads(out.read_text())
    # stored for the studies report: text only, rendered escaped
    from influscope.probes.base import stored_sections
    from influscope.storage import atomic_write_json

    (section,) = stored_sections(run)
    assert section.title.startswith("Probe: ") and "<td" in section.html
    stored = json.loads((run / "probes" / "length.json").read_text())
    stored["report_section"]["markdown"] = "| <b>x</b> |\n|---|\n| <script>y</script> |"
    atomic_write_json(run / "probes" / "length.json", stored)
    (section,) = stored_sections(run)
    assert "&lt;script&gt;" in section.html and "<script>" not in section.html
    assert result["lengths"] == [2, 12] and result["accuracy"][0] > result["accuracy"][1]
    assert svg.read_text().startswith("<svg")
    assert "| 12 | 3 | 4 |" in capsys.readouterr().out
    rep = tmp_path / "rep.jsonl"
    rows = [{"text": r["text"], "long": r["length"] > 4} for r in records]
    rep.write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["probe", "representation", "--model", str(tmp_path / "model"), "--data", str(rep)]
    assert main([*argv, "--properties", "long", "--folds", "2", "--out", str(out)]) == 0
    assert max(json.loads(out.read_text())["accuracy"]["long"]) > 0.9
    # --influence without --train is refused with the fix.
    assert main([*argv, "--properties", "long", "--influence"]) == 2
    assert "--influence needs the training records" in capsys.readouterr().err


def test_probe_cli_runs_prompting_and_id_ood(copy_model, tmp_path, capsys):
    import json

    from influscope.cli import main

    model, tok, train, config = copy_model
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")

    def dump(name, rows):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
        return str(tmp_path / name)

    queries = copy_records([3], 6, config.n_symbols, seed=8)
    demos = copy_records([2], 6, config.n_symbols, seed=9)
    base = ["probe", "prompting", "--model", str(tmp_path / "model")]
    out = tmp_path / "p.json"
    argv = [*base, "--queries", dump("q.jsonl", queries), "--demos", dump("d.jsonl", demos)]
    assert main([*argv, "--ks", "0", "1", "--separator", " | ", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ks"] == [0, 1]
    assert main([*argv, "--ks", "0", "7"]) == 2  # only 6 demonstrations
    assert "k=7 needs 7 demonstrations" in capsys.readouterr().err
    rows = [{"text": r["text"], "domain": "short" if r["length"] < 3 else "long"} for r in train]
    argv = [
        "probe",
        "id-ood",
        "--model",
        str(tmp_path / "model"),
        "--train",
        dump("t.jsonl", rows[:120]),
        "--eval",
        f"long={dump('e.jsonl', queries)}",
    ]
    assert main([*argv, "--influence", "--relatif", "--top-k", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sets"] == ["long"] and len(result["top1_from_nearest"]) == 1
    assert main([*argv[:-1], "long"]) == 2
    assert "--eval expects NAME=FILE" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["length", "representation"])
def test_docstring_examples_run(name):
    import doctest
    import importlib

    module = importlib.import_module(f"influscope.probes.{name}")
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
