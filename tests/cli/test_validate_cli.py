"""``influscope validate`` end to end on a tiny saved GPT-2: build, fit + score, validate score."""

from __future__ import annotations

import json

import pytest

from influscope.cli import main

TEXTS = [f"the cat number {i} sat on the mat and the dog {i} ran away" for i in range(10)]

RECIPE = ["--epochs", "1", "--lr", "1e-2", "--train-batch-size", "4", "--device", "cpu"]


def _data(workdir):
    return [
        "--model",
        str(workdir / "model"),
        "--train",
        str(workdir / "train.jsonl"),
        "--queries",
        str(workdir / "queries.jsonl"),
    ]


def test_validate_build_then_score_an_attribution_of_the_full_run(workdir, tmp_path, capsys):
    bank = tmp_path / "bank"
    build = ["validate", "build", "--bank", str(bank), *_data(workdir), *RECIPE]
    assert main([*build, "--fractions", "0.2", "0.5", "--subsets", "3"]) == 0
    assert (bank / "bank" / "bank" / "meta.json").is_file() and (bank / "model").is_dir()
    assert "validation bank" in capsys.readouterr().out
    # attribute on the bank's full-run model, then score the attribution against the bank
    run = tmp_path / "run"
    common = ["--model", str(bank / "model"), "--train", str(workdir / "train.jsonl")]
    common += ["--run", str(run), "--device", "cpu"]
    assert main(["fit", *common]) == 0
    assert main(["score", *common, "--queries", str(workdir / "queries.jsonl")]) == 0
    capsys.readouterr()
    score = ["validate", "score", "--bank", str(bank), "--run", str(run)]
    assert main([*score, *_data(workdir), *RECIPE, "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "LDS" in out and "remove top-2" in out
    result = json.loads((run / "validation" / "scores.json").read_text())
    assert [r["fraction"] for r in result["lds"]] == [0.2, 0.5]
    assert [r["n_dropped"] for r in result["lds"]] == [2, 5]
    assert result["removal"][0]["k"] == 2 and result["removal"][0]["queries"] == 1
    # the HTML report of the run shows the validation section
    assert main(["report", str(run), "--train", str(workdir / "train.jsonl"),
                 "--queries", str(workdir / "queries.jsonl")]) == 0  # fmt: skip
    page = (run / "studies.html").read_text()
    assert "Validation bank" in page and "LDS mean ± s.e.m." in page and "remove top-k" in page
    # a rebuild with the same options loads the stored bank; another lr is refused as stale
    assert main([*build, "--fractions", "0.2", "0.5", "--subsets", "3"]) == 0
    code = main([*build, "--fractions", "0.2", "0.5", "--subsets", "3", "--lr", "1e-3"])
    assert code == 2 and "different recipe" in capsys.readouterr().err


def test_validate_refuses_bad_fractions_and_scores_of_other_data(workdir, tmp_path, capsys):
    bank = tmp_path / "bank"
    code = main(["validate", "build", "--bank", str(bank), *_data(workdir), *RECIPE,
                 "--fractions", "0.01"])  # fmt: skip
    assert code == 2 and "removes 0 rows" in capsys.readouterr().err
    assert not bank.exists()
    code = main(["validate", "score", "--bank", str(bank), "--run", str(tmp_path)])
    assert code == 2 and "No validation bank" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["build"])
def test_validate_build_needs_model_train_and_queries(tmp_path, capsys, action):
    assert main(["validate", action, "--bank", str(tmp_path)]) == 2
    assert "needs --model, --train, --queries" in capsys.readouterr().err


def test_validate_and_magic_share_the_recipe_options(tmp_path, capsys):
    from influscope.cli import build_parser
    from influscope.cli.options import recipe_from_args

    recipe = ["--epochs", "2", "--lr", "3e-3", "--train-batch-size", "5", "--train-seed", "4",
              "--optimizer", "sgd", "--momentum", "0.9", "--schedule", "linear",
              "--weight-decay", "0.01", "--parameters", "h\\.1\\."]  # fmt: skip
    validate = build_parser().parse_args(["validate", "build", "--bank", "b", *recipe])
    magic = build_parser().parse_args(
        ["magic", "--model", "m", "--train", "t", "--queries", "q", "--run", "r", *recipe]
    )
    got = recipe_from_args(validate)
    assert got == recipe_from_args(magic)
    assert (got.batch_size, got.seed, got.momentum, got.schedule) == (5, 4, 0.9, "linear")
    assert validate.seed == 0  # validate's own --seed (the subsets) is not the recipe's
    # a recipe the library refuses is refused before the model loads (there is none here)
    code = main(["validate", "build", "--bank", str(tmp_path / "b"), "--model", "missing",
                 "--train", "t", "--queries", "q", "--momentum", "0.9"])  # fmt: skip
    assert code == 2 and "momentum is SGD's setting" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


USER_RECIPES = """
import torch
from influscope.metagrad.recipe import FinetuneConfig, finetune


def train(model, task, data, weights):
    return finetune(model, task, data, FinetuneConfig(lr=1e-2, batch_size=4), weights)


def noisy(model, task, data, weights):
    model = train(model, task, data, weights)
    with torch.no_grad():
        for p in model.parameters():  # unseeded: a different model on every call
            p.add_(1e-3 * torch.randn_like(p))
    return model
"""


def test_validate_build_with_a_users_training_function(workdir, tmp_path, capsys):
    (tmp_path / "recipes.py").write_text(USER_RECIPES)
    bank = tmp_path / "bank"
    args = ["validate", "build", "--bank", str(bank), *_data(workdir), "--device", "cpu"]
    args += ["--fractions", "0.5", "--subsets", "3"]
    assert main([*args, "--recipe", f"{tmp_path / 'recipes.py'}:train"]) == 0
    assert (bank / "bank" / "bank" / "meta.json").is_file()
    # a nondeterministic function is refused, naming the cause, and leaves nothing behind
    other = tmp_path / "other"
    noisy = [*args[:3], str(other), *args[4:], "--recipe", f"{tmp_path / 'recipes.py'}:noisy"]
    assert main(noisy) == 2
    assert "not deterministic" in capsys.readouterr().err
    assert not other.exists() or not any(other.rglob("*"))
    assert main([*args, "--recipe", f"{tmp_path / 'recipes.py'}:missing"]) == 2
    assert "defines no function 'missing'" in capsys.readouterr().err


def test_validate_a_lora_fine_tune_end_to_end(workdir, tmp_path, capsys):
    # the bank trains only the adapter (--parameters lora, the default with --adapter); BANK/model holds the trained
    # adapter, which fit / score load on top of its base model
    from transformers import GPT2LMHeadModel

    from conftest import lora

    adapter = tmp_path / "adapter"
    lora(GPT2LMHeadModel.from_pretrained(workdir / "model")).save_pretrained(adapter)
    bank = tmp_path / "bank"
    build = ["validate", "build", "--bank", str(bank), *_data(workdir), *RECIPE]
    build += ["--adapter", str(adapter), "--fractions", "0.5"]  # --parameters lora by default
    assert main([*build, "--subsets", "3"]) == 0
    assert (bank / "model" / "adapter_config.json").is_file()
    run = tmp_path / "run"
    common = ["--model", str(bank / "model"), "--train", str(workdir / "train.jsonl")]
    common += ["--run", str(run), "--device", "cpu"]
    assert main(["fit", *common]) == 0
    assert main(["score", *common, "--queries", str(workdir / "queries.jsonl")]) == 0
    capsys.readouterr()
    assert main(["validate", "score", "--bank", str(bank), "--run", str(run)]) == 0
    result = json.loads((run / "validation" / "scores.json").read_text())
    assert result["lds"][0]["subsets"] == 3 and result["lds"][0]["n_dropped"] == 5
