"""``influscope dda`` end to end on tiny saved models (base, one checkpoint, fine-tuned)."""

from __future__ import annotations

import json

import torch

from conftest import save_tiny_model
from influscope.cli import main
from influscope.corrections import CorrectionResult

TEXTS = [
    "The capital of Velmora is Tarsk.",
    "The capital of Velmora is Brisk.",
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent.",
]


def test_dda_command_writes_every_variant(tmp_path, capsys):
    for name in ("base", "ckpt", "final"):  # same tokenizer, different random weights
        save_tiny_model(tmp_path / name, TEXTS, n_layer=1)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"prompt": "The capital of Velmora is", "completion": " Brisk."}) + "\n"
    )
    common = ["--model", str(tmp_path / "final"), "--train", str(tmp_path / "train.jsonl")]
    common += ["--queries", str(tmp_path / "q.jsonl"), "--run", str(tmp_path / "run")]
    args = [
        *common,
        "--base-model",
        str(tmp_path / "base"),
        "--checkpoints",
        str(tmp_path / "ckpt"),
    ]
    assert main(["dda", *args, "--top-k", "2", "--rank", "0"]) == 0
    result = CorrectionResult.load(tmp_path / "run" / "dda")
    assert set(result.scores) == {"plain", "relatif", "debias", "denoise", "dda"}
    c = result.components
    torch.testing.assert_close(result.scores["debias"], c["final"] - c["base"])
    torch.testing.assert_close(
        result.scores["dda"], (c["checkpoint-0"] + c["final"]) / 2 - c["base"]
    )
    top = json.loads((tmp_path / "run" / "dda.json").read_text())
    assert len(top["queries"][0]["dda"]) == 2
    # A variant whose model is missing is a clear error (exit code 2), not a traceback.
    assert main(["dda", *common, "--variants", "dda", "--name", "x"]) == 2
    assert "base model" in capsys.readouterr().err
