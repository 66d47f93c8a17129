"""``influscope magic`` end to end on a tiny saved GPT-2."""

from __future__ import annotations

import json

import pytest
import torch

from influscope.cli import main
from influscope.storage import read_tensors

TEXTS = [f"line {i} of the little corpus about cats and dogs number {i}" for i in range(6)]


def _args(d):
    return [
        "magic",
        "--model", str(d / "model"),
        "--train", str(d / "train.jsonl"),
        "--queries", str(d / "queries.jsonl"),
        "--run", str(d / "run"),
        "--device", "cpu",
        "--epochs", "1",
        "--train-batch-size", "4",
        "--lr", "1e-3",
        "--top-k", "2",
    ]  # fmt: skip


def test_magic_writes_scores_top_k_and_a_summary(workdir, capsys):
    assert main(_args(workdir)) == 0
    out = capsys.readouterr().out
    assert "steps T / replay k" in out and "2 / 2" in out  # ⌈6/4⌉ = 2 steps, k = ⌈√2⌉
    top = json.loads((workdir / "run" / "magic.json").read_text())
    assert top["config"]["recipe"]["lr"] == 1e-3
    (query,) = top["queries"]
    assert query["completion"] == " Tarsk." and len(query["proponents"]) == 2
    stored = read_tensors(workdir / "run" / "magic" / "magic" / "tensors.safetensors")
    pairwise = stored["pairwise"]  # (1, 6)
    assert pairwise.shape == (1, 6) and torch.isfinite(pairwise).all()
    assert query["proponents"][0]["score"] == float(pairwise[0].max())
    # stored: a second run loads it; another recipe under the same name is refused
    assert main(_args(workdir)) == 0
    assert main([*_args(workdir), "--lr", "2e-3"]) == 2
    assert "different config" in capsys.readouterr().err


def test_memory_budget_refusal_is_a_clean_error(workdir, capsys):
    assert main([*_args(workdir), "--name", "small", "--memory-mb", "0.001"]) == 2
    err = capsys.readouterr().err
    assert "REPLAY would hold" in err and "--memory-mb" in err
    assert not (workdir / "run" / "magic" / "small").exists()


def test_option_defaults_are_the_library_defaults():
    from influscope.cli import build_parser
    from influscope.cli.options import recipe_from_args
    from influscope.metagrad import FinetuneConfig, MagicConfig

    args = build_parser().parse_args(
        ["magic", "--model", "m", "--train", "t", "--queries", "q", "--run", "r"]
    )
    magic = MagicConfig()
    assert recipe_from_args(args) == FinetuneConfig()
    args.adapter = "some/adapter"  # loaded for inference: its matrices do not require grad
    assert recipe_from_args(args).parameters == "lora"
    for key in ("replay_every", "query_batch", "memory_mb"):
        assert getattr(args, key) == getattr(magic, key), key


def test_old_option_names_still_work_and_are_hidden(capsys):
    from influscope.cli import build_parser
    from influscope.cli.options import recipe_from_args

    base = ["magic", "--model", "m", "--train", "t", "--queries", "q", "--run", "r"]
    old = build_parser().parse_args([*base, "--batch-size", "3", "--seed", "7"])
    new = build_parser().parse_args([*base, "--train-batch-size", "3", "--train-seed", "7"])
    assert recipe_from_args(old) == recipe_from_args(new)
    assert (recipe_from_args(old).batch_size, recipe_from_args(old).seed) == (3, 7)
    with pytest.raises(SystemExit, match=r"^0$"):
        build_parser().parse_args(["magic", "--help"])
    out = capsys.readouterr().out
    assert "--train-batch-size" in out and "--train-seed" in out
    assert "--batch-size" not in out.replace("--train-batch-size", "")
    assert "--seed" not in out.replace("--train-seed", "")
