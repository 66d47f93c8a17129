"""``influscope magic`` end to end on a tiny saved GPT-2."""

from __future__ import annotations

import json

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
        "--batch-size", "4",
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
    from influscope.cli.magic import _parameters
    from influscope.metagrad import FinetuneConfig, MagicConfig

    args = build_parser().parse_args(
        ["magic", "--model", "m", "--train", "t", "--queries", "q", "--run", "r"]
    )
    recipe, magic = FinetuneConfig(), MagicConfig()
    for key in ("epochs", "lr", "batch_size", "seed", "optimizer", "weight_decay", "momentum",
                "schedule"):  # fmt: skip
        assert getattr(args, key) == getattr(recipe, key), key
    assert _parameters(args) == recipe.parameters
    args.adapter = "some/adapter"  # loaded for inference: its matrices do not require grad
    assert _parameters(args) == "lora"
    for key in ("replay_every", "query_batch", "memory_mb"):
        assert getattr(args, key) == getattr(magic, key), key
