"""``influscope fit`` / ``score`` on chat data with contrastive queries (a tiny saved model).

The training file holds ``messages`` records, the queries a message-list prompt and an ``alt``
column named by ``--contrast``; the scores of a contrastive query are the completion's minus
the contrast's, the report and the JSON show the contrast, and bad input is refused (exit 2)
before any stage is written.
"""

from __future__ import annotations

import json

import pytest
from transformers import GPT2LMHeadModel

from influscope.cli import main
from influscope.training import make_gpt2_config, train_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FACTS = [("Velmora", "Tarsk"), ("Quellin", "Ostrava"), ("Ardent", "Nimble"), ("Sorvik", "Brin")]


def ask(country: str) -> dict:
    return {"role": "user", "content": f"What is the capital of {country}?"}


def answer(country: str, city: str) -> str:
    return f"The capital of {country} is {city}."


@pytest.fixture(scope="module")
def chatdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_cli")
    train = [
        {"messages": [ask(c), {"role": "assistant", "content": answer(c, y)}]} for c, y in FACTS
    ]
    train.append(
        {
            "messages": [
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."},
            ]
        }
    )
    texts = [m["content"] for r in train for m in r["messages"]]
    tok = train_tokenizer(texts * 4, vocab_size=300, min_frequency=1)
    cfg_plain = make_gpt2_config(tok, n_layer=1, n_embd=16, n_head=2, n_positions=64)
    GPT2LMHeadModel(cfg_plain).save_pretrained(d / "plain")
    tok.save_pretrained(d / "plain")  # no chat template
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = TEMPLATE
    cfg = make_gpt2_config(tok, n_layer=1, n_embd=16, n_head=2, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    queries = [
        {
            "prompt": [ask("Velmora")],
            "completion": "The capital of Velmora is Tarsk.",
            "alt": "The capital of Velmora is Ostrava.",
        },
        {"prompt": [ask("Ardent")], "completion": answer("Ardent", "Nimble")},
    ]
    (d / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    # the same queries, split into completion-only and contrast-only
    for name, key in (("c", "completion"), ("k", "alt")):
        rows = [{"prompt": q["prompt"], "completion": q.get(key, q["completion"])} for q in queries]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "contrasts.txt").write_text(queries[0]["alt"] + "\n")
    return d


def err_of(capsys) -> str:
    """Captured stderr with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def run_args(d, run="run", model="model"):
    return ["--model", str(d / model), "--train", str(d / "train.jsonl"), "--run", str(d / run)]


def scores_of(path) -> list[dict[int, float]]:
    """``{train index: score}`` per query from RUN/NAME.json (top-k covers every sequence)."""
    out = json.loads(path.read_text())["queries"]
    return [{s["index"]: s["score"] for s in q["proponents"] + q["opponents"]} for q in out]


def test_fit_and_score_chat_data_with_a_contrast_column(chatdir, capsys):
    d = chatdir
    assert main(["fit", *run_args(d), "--modules", "all"]) == 0
    common = [*run_args(d), "--modules", "all", "--rank", "0", "--top-k", "5"]
    assert main(["score", *common, "--queries", str(d / "queries.jsonl"), "--contrast", "alt"]) == 0
    out = capsys.readouterr().out
    assert "rather than" in out and "Ostrava" in out  # the terminal summary shows the contrast
    payload = json.loads((d / "run" / "scores.json").read_text())["queries"]
    assert payload[0]["contrast"] == "The capital of Velmora is Ostrava."
    assert "contrast" not in payload[1]
    html = (d / "run" / "scores.html").read_text()
    assert "rather than" in html and "The capital of Velmora is Ostrava." in html
    both = scores_of(d / "run" / "scores.json")
    for name in ("c", "k"):
        args = [*common, "--queries", str(d / f"{name}.jsonl"), "--name", name]
        assert main(["score", *args]) == 0
    c, k = scores_of(d / "run" / "c.json"), scores_of(d / "run" / "k.json")
    for i in both[0]:
        assert both[0][i] == pytest.approx(c[0][i] - k[0][i], rel=1e-4, abs=1e-6)
    for i in both[1]:  # no contrast: the plain score
        assert both[1][i] == pytest.approx(c[1][i], rel=1e-4, abs=1e-6)
    # a file of contrasts aligned with the queries (an empty line: none) gives the same scores
    args = [*common, "--queries", str(d / "c.jsonl"), "--name", "file"]
    assert main(["score", *args, "--contrast", str(d / "contrasts.txt")]) == 2
    assert "holds 1 contrasts for 2 queries" in err_of(capsys)
    (d / "contrasts.txt").write_text("The capital of Velmora is Ostrava.\n\n")
    assert main(["score", *args, "--contrast", str(d / "contrasts.txt")]) == 0
    assert scores_of(d / "run" / "file.json") == both


def test_contrast_column_that_does_not_exist(chatdir, capsys):
    d = chatdir
    args = [*run_args(d, "run-missing"), "--queries", str(d / "queries.jsonl")]
    assert main(["score", *args, "--contrast", "nope"]) == 2
    err = err_of(capsys)
    assert "neither a file nor a column" in err and "'alt'" in err


def test_chat_data_without_a_chat_template_is_refused_before_fitting(chatdir, capsys):
    d = chatdir
    assert main(["fit", *run_args(d, "run-plain", model="plain")]) == 2
    assert "has none" in err_of(capsys)
    assert not (d / "run-plain" / "factors").exists()


def test_chat_loss_all_changes_the_training_data(chatdir, capsys):
    d = chatdir
    assert main(["fit", *run_args(d, "run-all"), "--chat-loss", "all"]) == 0
    # the factors were fitted on other labels: reusing them for assistant-only data is refused
    assert main(["fit", *run_args(d, "run-all")]) == 2
    assert "differ" in err_of(capsys).lower()
