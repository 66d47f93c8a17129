"""A reward model made of a frozen pretrained sentence encoder and a small trained head.

    r(x) = w₂ᵀ tanh(W₁ e(x) + b₁) + b₂,    e(x) = mean over tokens of the encoder's last hidden states

``e`` is the sentence embedding of ``all-MiniLM-L6-v2`` (the ``minilm`` asset, mean pooling as in
sentence-transformers). Only the head is trained (Bradley–Terry loss) and tracked by influence
functions; its two linear layers are ``head.0`` and ``head.2``.

Because the encoder is frozen, ``e(x)`` is a fixed function of the token ids; the module
memoises it per distinct sequence, so the many passes of an influence analysis (training, the
curvature fit, self-influence, scores, baselines) run the encoder once per text. The memo is a
cache, not state: it never changes a result, and it is not saved.

Saved as ``head.safetensors`` + ``reward_head.json`` (the encoder directory and head size) in a
directory; :func:`load_reward_model` reloads it, or any Hugging Face sequence-classification
model with one label.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from torch import nn

from influscope.errors import DataError
from influscope.storage import atomic_write_json, atomic_write_tensors

__all__ = ["HEAD_FILE", "FrozenEncoderReward", "encoder_memo", "load_reward_model"]

HEAD_FILE = "reward_head.json"
_MEMOS: dict[str, dict[tuple[int, ...], torch.Tensor]] = {}


def encoder_memo(encoder_dir: str | Path) -> dict[tuple[int, ...], torch.Tensor]:
    """The process-wide memo of embeddings of the frozen encoder at ``encoder_dir`` (shared by
    every model loaded from it in this process; ~1.5 kB per distinct text for MiniLM)."""
    return _MEMOS.setdefault(str(Path(encoder_dir).resolve()), {})


class FrozenEncoderReward(nn.Module):
    """Frozen encoder + trainable two-layer head; ``forward`` returns an object with ``logits``.

    Args:
        encoder: A Hugging Face encoder (``AutoModel``) whose ``last_hidden_state`` is pooled.
        hidden: Width of the head's hidden layer.
        seed: Seed of the head's initialisation.
        encoder_dir: Where the encoder was loaded from (recorded by :meth:`save`).
        memo: A memo of pooled embeddings to share between models on the same encoder.
    """

    def __init__(
        self,
        encoder: nn.Module,
        hidden: int = 32,
        seed: int = 0,
        encoder_dir: str | None = None,
        memo: dict[tuple[int, ...], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        dim = int(encoder.config.hidden_size)
        torch.manual_seed(seed)
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.hidden = hidden
        self.encoder_dir = encoder_dir
        self._memo = memo if memo is not None else {}

    def train(self, mode: bool = True) -> FrozenEncoderReward:
        """Train mode for the head only: the encoder stays in eval mode (no dropout)."""
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def config(self):
        """The encoder's config (its context length bounds the inputs)."""
        return self.encoder.config

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled encoder states ``(B, D)``, memoised per distinct (unpadded) sequence."""
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask)]
        missing = [i for i, k in enumerate(keys) if k not in self._memo]
        if missing:
            ids, mask = input_ids[missing], attention_mask[missing]
            width = int(mask.sum(1).max())
            ids, mask = ids[:, :width], mask[:, :width]  # (M, T)
            states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (M,T,D)
            m = mask.unsqueeze(-1).to(states.dtype)  # (M, T, 1)
            pooled = (states * m).sum(1) / m.sum(1).clamp_min(1.0)  # (M, D)
            for i, row in zip(missing, pooled):
                self._memo[keys[i]] = row.float().cpu()
        dtype = self.head[0].weight.dtype
        return torch.stack([self._memo[k] for k in keys]).to(input_ids.device, dtype)  # (B, D)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.head(self.embed(input_ids, attention_mask))  # (B, 1)
        return SimpleNamespace(logits=logits)

    def save(self, directory: str | Path) -> Path:
        """Write the head's weights and its description to ``directory``."""
        directory = Path(directory)
        atomic_write_tensors(directory / "head.safetensors", self.head.state_dict())
        atomic_write_json(
            directory / HEAD_FILE,
            {"encoder_dir": self.encoder_dir, "hidden": self.hidden, "pooling": "mean"},
        )
        return directory


def load_reward_model(path: str | Path):
    """``(model, tokenizer)``: a saved :class:`FrozenEncoderReward`, or a Hugging Face
    sequence-classification model with one output.

    Raises:
        DataError: The path holds neither, or the head's encoder directory is missing.
    """
    path = Path(path)
    spec = path / HEAD_FILE
    if not spec.exists():
        from influscope.loading import load_model

        return load_model(path, task="reward")
    from transformers import AutoModel, AutoTokenizer

    meta = json.loads(spec.read_text())
    encoder_dir = Path(meta.get("encoder_dir") or "")
    if not encoder_dir.is_dir():
        raise DataError(
            f"{spec} names the encoder directory {str(encoder_dir)!r}, which does not exist. "
            "Fetch the assets (`make assets`) or edit encoder_dir in that file."
        )
    encoder = AutoModel.from_pretrained(encoder_dir)
    model = FrozenEncoderReward(
        encoder,
        hidden=int(meta["hidden"]),
        encoder_dir=str(encoder_dir),
        memo=encoder_memo(encoder_dir),
    )
    model.head.load_state_dict(load_file(str(path / "head.safetensors")))
    return model.eval(), AutoTokenizer.from_pretrained(encoder_dir)
