"""What a person reads in a report: the query text and the top proponent's text in the
Queries table, one numbering (from 0), no ``None`` chips, layers summarised, and
``report --model`` taking a ``.gguf`` file like every other command."""

from __future__ import annotations

import json

import pytest

import influscope.loading
from influscope.cli import main
from influscope.report import QueryView, ReportView, SequenceView, render_html
from influscope.report.summary import describe_layers, one_line, record_meta

# The `workdir` fixture (conftest.py) builds its model and data from these.
TEXTS = [
    "The capital of Velmora is Tarsk.",
    "Zorin Quell was born in Ostrava.",
    "Now is the winter of our discontent.",
]


def test_queries_table_shows_prompt_completion_and_the_top_proponent_text():
    top = SequenceView(
        342,
        1.5,
        ["<bos>", "Tarsk", " is"],
        [],
        meta={"source": "wiki"},
        text="Tarsk is the capital.",
    )
    q = QueryView("query 0", "The capital of Velmora is", " Tarsk.", proponents=[top])
    named = QueryView("fact-3 fr", "La capitale de Velmora est", " Tarsk.")
    page = render_html(ReportView(title="t", queries=[q, named]))
    index = page.split("<h2>Queries</h2>", 1)[1].split("</section>", 1)[0]
    assert 'The capital of Velmora is<mark class="completion"> Tarsk.</mark>' in index
    assert '<span class="idx">#342</span> Tarsk is the capital.' in index  # text, not tokens
    assert '<a href="#q-0"' in index and '<a href="#q-1"' in index
    assert "<h2>Query 0</h2>" in page and "<h2>Query 1 · fact-3 fr</h2>" in page
    assert 'id="q-0"' in page and 'id="q-1"' in page
    assert ">0</a></td>" in index and ">1</a></td>" in index  # the index counts from 0 too
    assert "Query 0 · query 0" not in page and "Query 1 ·</span>" not in page  # one numbering
    assert '<td class="num">#342</td>' in page  # the cards' "train #" column


def test_long_texts_are_cut_to_one_line():
    long = "word " * 100
    q = QueryView("query 0", long + "\nend of prompt", " yes", proponents=[])
    index = render_html(ReportView(title="t", queries=[q])).split("<h2>Queries</h2>", 1)[1]
    row = index.split("</tr>", 2)[1]
    assert '">…word word' in row and '⏎ end of prompt<mark class="completion"> yes' in row
    assert row.count("word") < 30  # cut to one line; the card below has the whole prompt
    assert one_line("a\n b   c", 80) == "a ⏎ b c" and len(one_line("x" * 200, 50)) == 50


def test_records_without_metadata_show_no_none_chips():
    assert record_meta({"text": "a", "fact_id": None, "lang": "", "source": "wiki"}) == {
        "source": "wiki"
    }
    seq = SequenceView(0, 1.0, ["a"], [], meta={"fact_id": "None", "lang": "fr"})
    page = render_html(ReportView(title="t", queries=[QueryView("q", "p", "c", [seq])]))
    assert "<b>lang</b> fr" in page and "fact_id" not in page


def test_layers_are_summarised():
    smol = [
        f"model.layers.{i}.mlp.{p}"
        for i in range(30)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert describe_layers(smol) == (
        "90 MLP projections in 30 blocks (mlp.gate_proj, mlp.up_proj, mlp.down_proj)"
    )
    attn = [f"h.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "k_proj")]
    assert describe_layers(attn) == "4 attention projections in 2 blocks (attn.q_proj, attn.k_proj)"
    uneven = ["h.0.mlp.c_fc", "h.1.mlp.c_fc", "h.0.attn.c_attn", "lm_head"]
    assert describe_layers(uneven) == (
        "3 layers in 2 blocks (mlp.c_fc ×2, attn.c_attn ×1), plus lm_head"
    )
    assert describe_layers(["fc1", "fc2"]) == "2 layers (fc1, fc2)"
    assert describe_layers([]) == "no layers"


@pytest.fixture(scope="module")
def scored(workdir):
    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    args += ["--run", str(workdir / "run")]
    assert main(["fit", *args]) == 0
    assert main(["score", *args, "--queries", str(workdir / "queries.jsonl")]) == 0
    return workdir


def test_fit_prints_one_damping_line(workdir, capsys):
    args = ["--model", str(workdir / "model"), "--train", str(workdir / "train.jsonl")]
    assert main(["fit", *args, "--run", str(workdir / "fit-run")]) == 0
    err = capsys.readouterr().err
    assert err.count("damping") == 1, err  # was one line per layer
    flat = " ".join(err.split())  # the console wraps long lines
    assert "damping: 0.1 × mean eigenvalue per layer; λ " in flat and "over 2 layers" in flat


def _report(workdir, model: str, out: str) -> int:
    return main(
        [
            "report",
            str(workdir / "run"),
            "--train",
            str(workdir / "train.jsonl"),
            "--queries",
            str(workdir / "queries.jsonl"),
            "--model",
            model,
            "--bootstrap",
            "0",
            "--out",
            str(workdir / out),
        ]
    )


def test_report_loads_a_gguf_model_like_every_other_command(scored, monkeypatch):
    """A ``.gguf`` path reaches :func:`influscope.loading.load_model` (here answering with the
    tiny model the run was scored with: writing a real GGUF with a tokenizer is too slow)."""
    gguf = scored / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    real, calls = influscope.loading.load_model, []

    def load(path, *args, **kwargs):
        calls.append(str(path))
        return real(scored / "model", *args, **kwargs)

    monkeypatch.setattr(influscope.loading, "load_model", load)
    assert _report(scored, str(gguf), "gguf.html") == 0
    assert calls == [str(gguf)]
    page = (scored / "gguf.html").read_text()
    assert f"per-token influence from {gguf}" in page and 'class="tok" style=' in page


def test_report_model_that_cannot_load_fails_clearly(scored, capsys):
    assert _report(scored, str(scored / "missing.gguf"), "x.html") == 2
    err = capsys.readouterr().err
    assert "expected a Hugging Face model directory" in err and "does not exist" in err
    broken = scored / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    assert _report(scored, str(broken), "x.html") == 2
    assert "Could not load a model from" in capsys.readouterr().err
    assert not (scored / "x.html").exists()
    assert _report(scored, "none", "plain.html") == 0  # explicit opt-out still works
    assert "no model found" in (scored / "plain.html").read_text()


def test_score_report_numbers_queries_from_zero(scored):
    page = (scored / "run" / "scores.html").read_text()
    assert "<h2>Query 0</h2>" in page and "4 MLP" not in page
    assert "2 MLP projections in 1 block (mlp.c_fc, mlp.c_proj)" in page
    records = json.loads((scored / "run" / "scores.json").read_text())["queries"]
    top = records[0]["proponents"][0]["index"]
    assert f'<span class="idx">#{top}</span> {TEXTS[top]}' in page
