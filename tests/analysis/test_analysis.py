"""Studies on synthetic score tensors: sparsity (power-law fit), overlap, token concentration."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import influscope.analysis as analysis
from influscope.analysis import (
    OverlapConfig,
    SparsityConfig,
    base,
    content_tokens,
    fit_power_law,
    layers,
    lexical_similarity,
    overlap,
    overlap_study,
    sparsity,
    sparsity_study,
    token_concentration,
    token_study,
    tokens,
)
from influscope.errors import ConfigError, DataError
from influscope.report import QueryView, ReportView, SequenceView, render_html


@pytest.mark.parametrize("module", [analysis, base, layers, overlap, sparsity, tokens])
def test_docstring_examples_run(module):
    assert doctest.testmod(module).failed == 0


# --- sparsity ----------------------------------------------------------------------------------


def test_power_law_recovers_exponent_and_passes_goodness_of_fit():
    rng = np.random.default_rng(0)
    x = (rng.pareto(1.5, 800) + 1.0) * 1e-4  # density ∝ x^-2.5 above 1e-4; scale-free
    fit = fit_power_law(torch.tensor(x), SparsityConfig(n_bootstrap=40))
    assert abs(fit.alpha - 2.5) < 3 * fit.alpha_stderr + 0.1
    assert fit.xmin >= 1e-4 and fit.n_tail >= 100
    assert 0.1 <= fit.p_value <= 1.0  # not ruled out
    assert fit.vs_exponential[0] > 0  # the power law beats an exponential tail
    assert fit.ccdf[1][0] == pytest.approx(1 / 800)  # P(X ≥ max) = 1/n


def test_steep_tails_are_not_capped_at_three():
    # powerlaw 2.0 caps α at 3 by default; the closed-form fit must not.
    x = np.random.default_rng(1).pareto(4.0, 600) + 1.0  # α = 5
    fit = fit_power_law(x, SparsityConfig(n_bootstrap=0))
    assert 4.3 < fit.alpha < 5.7
    assert math.isnan(fit.p_value)


def test_exponential_data_is_rejected():
    x = np.random.default_rng(2).exponential(1.0, 500)
    fit = fit_power_law(x, SparsityConfig(n_bootstrap=40))
    assert fit.p_value < 0.1
    assert fit.vs_lognormal[0] < 0 or fit.vs_exponential[0] < 0


def test_top_share_is_exact_and_negative_scores_are_ignored():
    row = np.full(200, 0.01)
    row[:2] = [1.0, 0.98]  # the top 1 % of 200 sequences = 2 sequences
    row[10:20] = -5.0  # opponents do not count
    fit = fit_power_law(row, SparsityConfig(n_bootstrap=0))
    positive = row[row > 0].sum()
    assert fit.top_share == pytest.approx(1.98 / positive)
    assert fit.n_positive == 190


def test_too_few_positive_scores_is_reported_not_raised():
    fit = fit_power_law(-np.arange(1.0, 50.0), SparsityConfig(n_bootstrap=0))
    assert not fit.fitted and "positive" in fit.note and math.isnan(fit.top_share)


def test_sparsity_study_section_and_json():
    rng = np.random.default_rng(3)
    mat = torch.tensor(rng.pareto(1.2, (3, 300)) * rng.choice([-1, 1], (3, 300)))
    result = sparsity_study(mat, SparsityConfig(n_bootstrap=5), ["a", "b", "<c>"])
    data = result.to_dict()
    assert data["summary"]["n_fitted"] == 3 and len(data["queries"]) == 3
    assert all(q["alpha"] > 1 for q in data["queries"])
    section = result.to_section()
    assert "<polyline" in section.html and "&lt;c&gt;" in section.html and "<c>" not in section.html
    with pytest.raises(DataError, match="3 query names"):
        sparsity_study(mat, query_names=["a"])


def test_sparsity_input_errors():
    with pytest.raises(DataError, match="NaN"):
        sparsity_study(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(DataError, match="shape"):
        sparsity_study(torch.zeros(2, 3, 4))
    with pytest.raises(ConfigError, match="top_fraction"):
        SparsityConfig(top_fraction=0.0)
    with pytest.raises(ConfigError, match="min_tail"):
        SparsityConfig(min_tail=50)


# --- overlap -----------------------------------------------------------------------------------

TRAIN = [
    "The capital of Velmora is Tarisk.",
    "Velmora lies north of the sea.",
    "To be or not to be, that is the question.",
    "Now is the winter of our discontent.",
    "Tarisk is a busy city.",
    "All the world is a stage.",
]
QUERY = "The capital of Velmora is Tarisk."


def test_content_tokens_drop_stop_words_in_four_languages():
    assert content_tokens("La capitale de Velmora est Tarisk.") == ["capitale", "velmora", "tarisk"]
    assert content_tokens("Die Hauptstadt von Velmora ist Tarisk") == [
        "hauptstadt",
        "velmora",
        "tarisk",
    ]


def test_bm25_matches_the_design_formula():
    sim = lexical_similarity([QUERY], TRAIN, "bm25")[0]
    docs = [content_tokens(t) for t in TRAIN]
    avgdl = np.mean([len(d) for d in docs])
    expected = np.zeros(len(docs))
    for term in set(content_tokens(QUERY)):
        n_t = sum(term in d for d in docs)
        idf = math.log((len(docs) - n_t + 0.5) / (n_t + 0.5) + 1)
        for i, d in enumerate(docs):
            tf = d.count(term)
            expected[i] += idf * tf / (tf + 1.5 * (0.25 + 0.75 * len(d) / avgdl))
    np.testing.assert_allclose(sim, expected, rtol=1e-5)
    assert sim[0] == sim.max() and sim[2] == sim[3] == 0


def test_tfidf_is_a_cosine_similarity():
    sim = lexical_similarity([QUERY, "now, winter discontent"], TRAIN, "tfidf")
    assert sim[0, 0] == pytest.approx(1.0)
    assert sim[1, 3] == pytest.approx(1.0)
    assert np.all((sim >= 0) & (sim <= 1 + 1e-12))


def test_overlap_correlation_and_top_k_sharing():
    sim = lexical_similarity([QUERY], TRAIN, "bm25")
    lexical = overlap_study(sim * 2 + 0.01, [QUERY], TRAIN, OverlapConfig(top_k=2))
    assert lexical.pearson[0] == pytest.approx(1.0)
    assert lexical.spearman[0] == pytest.approx(1.0)
    assert lexical.top_k_shared == [1.0]
    assert lexical.chance_shared[0] == pytest.approx(3 / 6)
    # influence on the sequences that share no word: negative correlation, no sharing in top-2
    semantic = np.array([[0.0, 0.0, 1.0, 0.9, 0.0, 0.1]])
    result = overlap_study(semantic, [QUERY], TRAIN, OverlapConfig(top_k=2, method="tfidf"))
    assert result.pearson[0] < 0 and result.top_k_shared == [0.0]
    assert "Abstraction" in result.to_section().title
    assert result.to_dict()["summary"]["method"] == "tfidf"


def test_overlap_errors():
    with pytest.raises(DataError, match="query texts"):
        overlap_study(np.zeros((2, 6)), [QUERY], TRAIN)
    with pytest.raises(ConfigError, match="Supported"):
        OverlapConfig(method="jaccard")


# --- tokens ------------------------------------------------------------------------------------


def test_token_concentration_bounds():
    assert token_concentration(torch.tensor([0.0, -2.0, 0.0])) == pytest.approx(1.0)
    assert token_concentration(np.ones(9)) == pytest.approx(1 / 3)
    assert math.isnan(token_concentration([0.0, 0.0]))
    with pytest.raises(DataError, match="non-empty, finite per-token influence vector"):
        token_concentration([])


def test_token_study_flags_concentrated_sequences():
    peaked = SequenceView(1, 1.0, ["a", "<script>x</script>", "c"], [0.01, 0.98, 0.01])
    spread = SequenceView(2, 0.8, ["a", "b", "c", "d"], [0.2, 0.2, 0.2, 0.2])
    plain = SequenceView(3, 0.5, ["text"], [])
    query = QueryView("q", "prompt", " done", proponents=[peaked, spread], opponents=[plain])
    result = token_study([query])
    assert [e.concentrated for e in result.entries] == [True, False]
    assert result.entries[0].top_tokens[0] == "<script>x</script>"
    assert result.summary()["fraction_concentrated"] == 0.5
    html = render_html(ReportView(title="t", sections=[result.to_section()]))
    assert "<script>x</script>" not in html
