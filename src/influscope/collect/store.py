"""On-disk layout of what a collector saved, and read access to it.

Layout of a collection directory ``OUT/``::

    checkpoints/checkpoint-<s>/     save_pretrained of θ_s (s = checkpoint_every, 2·…, …)
    checkpoints/checkpoint-<s>/trainer_state.json   {"global_step": s, "log_history": [...]}
    checkpoints/trainer_state.json  the same for the newest checkpoint
    initial/                        θ_0, saved when gradients are collected at s = 0
    gradients/meta.json             config, layer layout (as a gradient index), dim, dtype
    gradients/projector.safetensors P_in, P_out per layer (LograProjector.tensors())
    gradients/steps/step-<s>.safetensors
        indices (B,) int64   example index of each row
        rows    (B, D)       concat_ℓ vec(P_out ∇_{W_ℓ} L(z, θ_s) P_inᵀ), L the summed token loss
        lr      ()  float64  learning rate of optimizer step s + 1 (which used these gradients)

``log_history`` holds ``{"step": k, "learning_rate": η_k}`` for every optimizer step ``k``
(``η_k`` moved θ_{k-1} to θ_k), so :func:`influscope.trajectory.from_directory` reads the
``checkpoints/`` folder with exact segment-mean learning rates. Every file is written
atomically (temporary name, then rename); a checkpoint folder is written under a temporary
name beside ``checkpoints/`` and renamed into it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from influscope.errors import ConfigError, DataError
from influscope.projection import LograProjector
from influscope.storage import atomic_write_json, atomic_write_tensors, read_json, read_tensors

__all__ = ["CollectedGradients", "checkpoint_dir", "save_checkpoint", "step_path"]


def step_path(root: Path, step: int) -> Path:
    """``gradients/steps/step-<s>.safetensors`` of parameter step ``s``."""
    return Path(root) / "gradients" / "steps" / f"step-{step:08d}.safetensors"


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """Folder of ``θ_s``: ``initial/`` for ``s = 0``, else ``checkpoints/checkpoint-<s>/``."""
    root = Path(root)
    return root / "initial" if step == 0 else root / "checkpoints" / f"checkpoint-{step}"


def save_checkpoint(model: nn.Module, root: str | Path, step: int, lr_log: list[dict]) -> Path:
    """Save ``θ_step`` with ``save_pretrained`` and the learning-rate log, atomically.

    Raises:
        ConfigError: The model has no ``save_pretrained`` (not a Hugging Face model).
    """
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(
            f"Checkpoints are saved with save_pretrained, which {type(model).__name__} lacks. "
            "Collect from a Hugging Face PreTrainedModel, or set checkpoint_every=None and "
            "save the model yourself."
        )
    final = checkpoint_dir(root, step)
    tmp = Path(root) / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    state = {"global_step": step, "log_history": [e for e in lr_log if e["step"] <= step]}
    atomic_write_json(tmp / "trainer_state.json", state)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if step > 0:
        atomic_write_json(final.parent / "trainer_state.json", state)
    return final


class CollectedGradients:
    """Read access to ``OUT/gradients/`` written by a collector.

    Args:
        root: The collection directory ``OUT`` (the one given to the collector).

    Raises:
        DataError: No collected gradients under ``root``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta = self.root / "gradients" / "meta.json"
        if not meta.is_file():
            raise DataError(
                f"No collected gradients under {self.root} (expected {meta}). Train with an "
                "InfluenceCallback / GradientCollector whose config has gradients=True and "
                "out_dir set to this directory."
            )
        self.meta = read_json(meta)

    @property
    def layout(self) -> list[dict]:
        """Layer layout of a row (``name``, ``size``, ``offset``, ``k_out``, ``k_in``)."""
        return self.meta["layout"]

    @property
    def layer_names(self) -> list[str]:
        return [e["name"] for e in self.layout]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def steps(self) -> list[int]:
        """Parameter steps ``s`` with collected gradients, ascending."""
        folder = self.root / "gradients" / "steps"
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name[5:-12]) for p in folder.glob("step-*.safetensors") if p.name[5:-12].isdigit()
        )

    def projector(self) -> LograProjector:
        """The LoGra projections the rows were taken with."""
        return LograProjector.from_tensors(
            read_tensors(self.root / "gradients" / "projector.safetensors")
        )

    def load(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(indices (B,), rows (B, D), lr)`` collected at parameter step ``step``.

        Raises:
            DataError: Nothing was collected at that step.
        """
        path = step_path(self.root, step)
        if not path.is_file():
            raise DataError(
                f"No gradients collected at parameter step {step} under {self.root}; collected "
                f"steps: {self.steps[:20]}{' …' if len(self.steps) > 20 else ''}."
            )
        t = read_tensors(path)
        return t["indices"], t["rows"], float(t["lr"])

    def latest(self, steps: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Each example's most recent collected row among ``steps`` (default: all).

        Returns:
            ``(indices (N,), rows (N, D), step of each row)`` sorted by example index.

        Raises:
            DataError: No collected step among ``steps``.
        """
        chosen = self.steps if steps is None else sorted(steps)
        if not chosen:
            raise DataError(f"No collected gradients to read under {self.root} (steps={steps}).")
        rows: dict[int, tuple[torch.Tensor, int]] = {}
        for s in chosen:
            idx, r, _ = self.load(s)
            for i, row in zip(idx.tolist(), r):
                rows[i] = (row, s)  # later steps overwrite earlier ones
        order = sorted(rows)
        return (
            torch.tensor(order, dtype=torch.long),
            torch.stack([rows[i][0] for i in order]),
            [rows[i][1] for i in order],
        )


def write_meta(root: Path, meta: dict, projector: LograProjector) -> None:
    """Write ``gradients/meta.json`` and the projections (once per collection)."""
    atomic_write_tensors(root / "gradients" / "projector.safetensors", projector.tensors())
    atomic_write_json(root / "gradients" / "meta.json", meta)


def write_step(root: Path, step: int, indices: torch.Tensor, rows: torch.Tensor, lr: float) -> None:
    """Write one step's rows atomically."""
    atomic_write_tensors(
        step_path(root, step),
        {
            "indices": indices.to(torch.long),
            "rows": rows,
            "lr": torch.tensor(float(lr), dtype=torch.float64),
        },
    )
