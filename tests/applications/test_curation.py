"""Data curation by total influence: a reduced version of benchmarks/curation.py (toy MLP)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from influscope import ConfigError, FitConfig
from influscope.applications.curation import (
    harmful_subset,
    highest_loss_subset,
    n_removed,
    random_subset,
    rank_by_influence,
)
from influscope.evaluation import MislabelConfig, flip_labels
from influscope.toy import VectorClassificationTask, make_classification, train_mlp


class LogLikelihoodTask(VectorClassificationTask):
    """Measurement ``log p(y | x)`` (so the benchmark loss is ``-f``)."""

    def measurement(self, model, batch):
        return -F.cross_entropy(self.outputs(model, batch), batch["y"], reduction="none")


def _benchmark_loss(model, data) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(data.xq), data.yq))


def test_removing_harmful_beats_reversed_and_random():
    """Floor: dropping the most harmful 15 % (by influence on a clean benchmark) gives a lower
    benchmark loss than keeping everything, than dropping the most helpful 15 % (reversed
    ranking) and than random 15 %. Measured: 0.435 vs 0.756 (none), 1.230 (reversed), 0.856
    (random). A sign error swaps the first two; shuffled totals failed this test for all 5
    shuffles tried."""
    clean = make_classification(n=160, n_queries=64, noise=1.0, seed=3)
    noisy, flipped = flip_labels(clean.y, 4, MislabelConfig(fraction=0.2, seed=0))
    clean.y = torch.tensor(noisy)
    train = clean.train()
    model = train_mlp(clean.x, clean.y, steps=200)
    ranking = rank_by_influence(
        model,
        LogLikelihoodTask(),
        train,
        clean.queries(),
        fit_config=FitConfig(curvature="ekfac"),
        modules=["l1", "l2", "l3"],
    )
    n = len(train)
    frac = 0.15
    harmful = harmful_subset(ranking.total, frac)
    helpful = harmful_subset(-ranking.total, frac)
    assert len(harmful) == n_removed(n, frac) == 24

    def loss_without(removed, seed=0):
        keep = [i for i in range(n) if i not in set(removed)]
        return _benchmark_loss(train_mlp(clean.x, clean.y, keep, seed, steps=200), clean)

    by_influence = loss_without(harmful)
    assert by_influence < loss_without([]) - 0.1
    reversed_ = loss_without(helpful)
    rand = sum(loss_without(random_subset(n, frac, s)) for s in range(2)) / 2
    assert by_influence < reversed_ - 0.05, (by_influence, reversed_)
    assert by_influence < rand, (by_influence, rand)
    # The harmful end is enriched in flipped labels (the planted harm).
    assert flipped[harmful].mean() > 2 * flipped.mean()


def test_subsets_and_errors():
    total = torch.tensor([0.5, -2.0, 1.0, -0.1, 3.0])
    assert harmful_subset(total, 0.4) == [1, 3]
    assert highest_loss_subset(total, 0.2) == [4]
    assert random_subset(5, 0.4, 0) == random_subset(5, 0.4, 0)
    assert len(random_subset(100, 0.05, 1)) == 5
    with pytest.raises(ConfigError, match="fraction"):
        harmful_subset(total, 1.5)


def test_cli_curate_flags_the_most_harmful_and_writes_kept_records(tmp_path):
    """``influscope curate`` ranks by total influence (same as the API) and drops the flagged."""
    import json

    from conftest import save_tiny_model
    from influscope.cli import main

    texts = [f"the cat {w} on the mat number {i}" for i, w in enumerate(["sat", "ran"] * 6)]
    model_dir = save_tiny_model(tmp_path / "m", texts)
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"prompt": "the cat", "completion": " sat on the mat"}) + "\n")
    out, kept = tmp_path / "curate.json", tmp_path / "kept.jsonl"
    argv = [str(model_dir), "--train", str(train), "--benchmark", str(bench)]
    argv += ["--fraction", "0.25", "--out", str(out), "--kept", str(kept), "--device", "cpu"]
    assert main(["curate", *argv]) == 0
    report = json.loads(out.read_text())
    total = torch.tensor(report["total"])
    assert len(report["harmful"]) == 3
    assert sorted(report["harmful"]) == sorted(torch.argsort(total)[:3].tolist())
    assert report["order"][:3] == torch.argsort(total, stable=True)[:3].tolist()
    kept_texts = [json.loads(line)["text"] for line in kept.read_text().splitlines()]
    assert kept_texts == [t for i, t in enumerate(texts) if i not in report["harmful"]]
    assert main(["curate", *argv[:-2], "--fraction", "1.5"]) != 0
