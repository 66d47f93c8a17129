"""Layers, languages and word order on synthetic scores; `influscope report` on a stored run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from influscope.analysis import (
    SparsityConfig,
    StudyConfig,
    language_study,
    layer_study,
    layer_thirds,
    report_run,
    restrict_scores,
    word_order_study,
)
from influscope.analysis import languages as languages_module
from influscope.analysis import word_order as word_order_module
from influscope.cli import main
from influscope.errors import DataError
from influscope.scoring.pairwise import Scores
from influscope.storage import RunDirectory, atomic_write_json

LAYERS = [f"transformer.h.{b}.mlp.{m}" for b in range(3) for m in ("c_fc", "c_proj")]


def layered_scores(seed: int = 0, n: int = 30) -> Scores:
    g = torch.Generator().manual_seed(seed)
    per = torch.randn(2, n, len(LAYERS), generator=g, dtype=torch.float64) * 0.01
    per[..., 2:4] += torch.rand(2, n, 2, generator=g, dtype=torch.float64)  # block 1 dominates
    return Scores(per.sum(-1), list(LAYERS), list(range(n)), per_layer=per)


# --- layers ------------------------------------------------------------------------------------


def test_layer_thirds_by_block():
    thirds = layer_thirds(LAYERS)
    assert thirds == {"lower": LAYERS[:2], "middle": LAYERS[2:4], "upper": LAYERS[4:]}
    two = layer_thirds(["h.0.mlp", "h.1.mlp"])
    assert two == {"lower": ["h.0.mlp"], "middle": [], "upper": ["h.1.mlp"]}
    assert layer_thirds(["fc", "head"])["lower"] == ["fc"]  # no block numbers: by position


def test_layer_shares_sum_to_one_and_find_the_dominant_block():
    scores = layered_scores()
    result = layer_study(scores, ["q0", "q1"], top_k=5)
    np.testing.assert_allclose(np.sum(result.abs_share, axis=1), 1.0)
    np.testing.assert_allclose(np.sum(result.top_share, axis=1), 1.0)
    assert min(result.third_share["middle"]) > 0.9
    assert min(result.third_spearman["middle"]) > 0.95
    assert min(result.third_top_overlap["middle"]) >= 0.8
    rows, cols, values = result.heatmaps[0]
    assert rows == LAYERS and len(cols) == 5 and len(values) == len(LAYERS)
    full_top = scores.top(0, 5)
    assert cols[0] == f"#{full_top[0][0]}"
    assert sum(v[0] for v in values) == pytest.approx(full_top[0][1])
    section = result.to_section()
    assert "middle" in section.html and "<svg" in section.html


def test_restricted_scores_add_up():
    scores = layered_scores()
    thirds = layer_thirds(LAYERS)
    total = sum(restrict_scores(scores, names) for names in thirds.values())
    torch.testing.assert_close(total, scores.pairwise)
    with pytest.raises(DataError, match="Unknown layers"):
        restrict_scores(scores, ["h.9"])
    with pytest.raises(DataError, match="per_layer=True"):
        layer_study(Scores(scores.pairwise, LAYERS, list(range(30))))


# --- languages ---------------------------------------------------------------------------------


def multilingual(n_en_only: int = 4) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Facts 0..n-1 stated only in English (2 sequences each), fact 'multi' in en+fr."""
    train = [{"text": "noise", "fact_id": None, "lang": "en"} for _ in range(10)]
    for f in range(n_en_only):
        train += [{"fact_id": f"f{f}", "lang": "en"} for _ in range(2)]
    train += [{"fact_id": "multi", "lang": "en"}, {"fact_id": "multi", "lang": "fr"}]
    queries = [
        {"fact_id": fact, "lang": lang}
        for lang in ("en", "fr", "de")
        for fact in [*(f"f{f}" for f in range(n_en_only)), "multi"]
    ]
    queries.append({"prompt": "free text", "completion": "!"})
    rng = np.random.default_rng(0)
    mat = rng.normal(0, 1e-3, (len(queries), len(train)))
    weight = {"en": 1.0, "fr": 0.5, "de": 0.25}
    for q, rec in enumerate(queries):
        for m, t in enumerate(train):
            if rec.get("fact_id") and t["fact_id"] == rec["fact_id"]:
                mat[q, m] = weight[rec["lang"]]
    return mat, queries, train


def test_language_ratios_are_relative_to_the_english_query():
    mat, queries, train = multilingual()
    result = language_study(mat, queries, train)
    assert result.languages == ["en", "de", "fr"]
    assert result.facts == ["f0", "f1", "f2", "f3"]  # 'multi' is not English-only
    s = result.summary()
    assert s["en"]["median_ratio"] == pytest.approx(1.0)
    assert s["fr"]["median_ratio"] == pytest.approx(0.5)
    assert s["de"]["median_ratio"] == pytest.approx(0.25)
    assert s["fr"]["top1_rate"] == 1.0 and s["fr"]["mean_percentile"] > 0.95
    assert "fr" in result.to_section().html
    json.dumps(result.to_dict())


def test_language_study_needs_source_queries():
    mat, queries, train = multilingual()
    only_fr = [dict(q, lang="it") if q.get("lang") == "en" else q for q in queries]
    with pytest.raises(DataError, match="asked in 'en' and another"):
        language_study(mat, only_fr, train)
    with pytest.raises(DataError, match="asked twice"):
        language_study(mat, [*queries[:-1], queries[0]], train)
    with pytest.raises(DataError, match="training records"):
        language_study(mat, queries, train[:-1])


# --- word order --------------------------------------------------------------------------------


def ordered() -> tuple[np.ndarray, list[dict], list[dict]]:
    train = [{"fact_id": None, "order": None} for _ in range(10)]
    for f in range(3):  # f0..f2 forward only; f3, f4 in both orders
        train += [{"fact_id": f"f{f}", "order": "forward"}] * 2
    for f in (3, 4):
        train += [
            {"fact_id": f"f{f}", "order": "forward"},
            {"fact_id": f"f{f}", "order": "reversed"},
        ]
    queries = [{"fact_id": f"f{f}", "order": o} for o in ("forward", "reversed") for f in range(5)]
    value = {
        ("forward", "forward"): 1.0,
        ("reversed", "forward"): 0.1,
        ("forward", "reversed"): 0.2,
        ("reversed", "reversed"): 0.8,
    }
    mat = np.zeros((len(queries), len(train)))
    for q, rec in enumerate(queries):
        for m, t in enumerate(train):
            if t["fact_id"] == rec["fact_id"]:
                mat[q, m] = value[(rec["order"], t["order"])]
    return mat, queries, train


def test_word_order_ratios():
    mat, queries, train = ordered()
    result = word_order_study(torch.tensor(mat), queries, train)
    s = result.summary()
    assert s["reversed_query_ratio"] == {"n_facts": 5, "median": pytest.approx(0.1)}
    assert s["key_after_completion_ratio"] == {"n_facts": 2, "median": pytest.approx(0.2)}
    grid = s["grid"]
    assert grid["query forward / train forward"]["median_mean_influence"] == 1.0
    assert grid["query reversed / train reversed"]["n_facts"] == 2
    assert "Word order" in result.to_section().title


def test_word_order_needs_orders():
    mat, queries, train = ordered()
    with pytest.raises(DataError, match="order"):
        word_order_study(mat, [{"fact_id": q["fact_id"]} for q in queries], train)


def test_modules_document_their_math():
    for module in (languages_module, word_order_module):
        assert "ratio" in module.__doc__ and "Grosse" in module.__doc__


# --- a stored run, rendered by the CLI ---------------------------------------------------------

EVIL = "<script>window.__pwned = 1</script> Velmora"


@pytest.fixture
def stored_run(tmp_path):
    mat, queries, train = multilingual()
    train[0] = {"text": EVIL, "fact_id": None, "lang": "en"}
    for i, rec in enumerate(train):
        rec.setdefault("text", f"sentence {i} about {rec.get('fact_id')}")
    for rec in queries:
        rec.setdefault("prompt", f"Where is {rec.get('fact_id')}?")
        rec.setdefault("completion", " There.")
    n, n_l = mat.shape[1], len(LAYERS)
    per = torch.tensor(mat)[..., None].repeat(1, 1, n_l) / n_l
    run = RunDirectory(tmp_path / "run")
    meta = {"layers": LAYERS, "train_indices": list(range(n)), "curvature": "ekfac"}
    run.save("scores", "scores", {"pairwise": torch.tensor(mat), "per_layer": per}, meta)
    atomic_write_json(tmp_path / "run" / "data.json", {"records": train, "queries": queries})
    return tmp_path / "run"


def test_report_run_runs_every_supported_study(stored_run):
    config = StudyConfig(sparsity=SparsityConfig(n_bootstrap=0))
    view, studies = report_run(stored_run, model="none", config=config)
    assert list(studies) == ["sparsity", "layers", "overlap", "languages"]
    assert view.sections[0].title.startswith("Sparsity")
    assert view.layer_heatmap is not None and len(view.queries) == 16
    saved = json.loads((stored_run / "studies.json").read_text())
    assert saved["languages"]["summary"]["fr"]["median_ratio"] == pytest.approx(0.5)


def test_cli_report_writes_one_escaped_page(stored_run, tmp_path, capsys):
    out = tmp_path / "page.html"
    code = main(
        ["report", str(stored_run), "--bootstrap", "0", "--model", "none", "--out", str(out)]
    )
    assert code == 0
    page = out.read_text()
    assert "&lt;script&gt;window.__pwned" in page and "<script>window" not in page
    assert "Languages: cross-lingual influence" in page and "http" not in page.split("<body>")[1]
    assert "report →" in capsys.readouterr().err


def test_cli_report_errors_are_clear(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "No scores stage 'scores'" in capsys.readouterr().err


def test_demo_runs_find_their_records_in_the_saved_corpus(tmp_path):
    from influscope.demo.corpus import DemoCorpus, free_text_queries

    train = [{"text": f"line {i}", "fact_id": None} for i in range(12)]
    queries = [{"prompt": "The capital of Velmora is", "completion": " Tarsk.", "fact_id": "f0"}]
    DemoCorpus(train, queries, []).save(tmp_path / "model" / "corpus.json")
    n_q = 1 + len(free_text_queries())  # the demo appends the free-text queries
    pairwise = torch.randn(n_q, 12, dtype=torch.float64)
    meta = {"layers": [], "train_indices": list(range(12))}
    RunDirectory(tmp_path).save("scores", "scores", {"pairwise": pairwise}, meta)
    view, studies = report_run(tmp_path, config=StudyConfig(sparsity=SparsityConfig(n_bootstrap=0)))
    assert view.queries[0].name == "f0" and view.queries[-1].completion.strip()
    assert "layers" not in studies and "sparsity" in studies


def test_report_run_appends_stored_probe_sections(stored_run):
    # `influscope probe KIND --run RUN` stores RUN/probes/KIND.json; the studies report shows it
    atomic_write_json(
        stored_run / "probes" / "length.json",
        {"report_section": {"title": "Length", "markdown": "| L | acc |\n|---|---|\n| 4 | 0.9 |"}},
    )
    config = StudyConfig(sparsity=SparsityConfig(n_bootstrap=0))
    view, _ = report_run(stored_run, model="none", config=config)
    assert view.sections[-1].title == "Probe: Length" and "0.9" in view.sections[-1].html
