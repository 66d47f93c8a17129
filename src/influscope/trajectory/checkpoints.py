"""Checkpoints of one training run, in step order, for trajectory-aware attribution.

A :class:`Trajectory` is an ordered list of :class:`TrajectoryCheckpoint` — a training step,
the mean learning rate of the steps that led to it from the previous checkpoint, and a way
to load the model. Segment ``ℓ`` of the run is the stretch of steps ``(s_{ℓ-1}, s_ℓ]`` that
ends at checkpoint ``ℓ`` (``s_0 = 0``); SOURCE (:mod:`influscope.trajectory.source`) and
TracIn-CP (:func:`influscope.trajectory.tracin_scores`) both consume it.

Three sources (:func:`load_trajectory` picks by type):

* :func:`from_train_result` — the :class:`~influscope.training.Checkpoint` list of
  :func:`influscope.training.train_lm` (``checkpoint_every=...``); its ``lr`` is the learning
  rate of the checkpoint's own step, used as the segment's mean (an approximation when the
  schedule changes between checkpoints — pass ``mean_lrs`` for the exact means).
* :func:`from_directory` — a Hugging Face Trainer ``output_dir`` with ``checkpoint-<step>/``
  folders; the learning rates come from ``trainer_state.json``'s ``log_history``
  (mean of the logged ``learning_rate`` values within each segment) or from ``lr=``.
* :func:`from_models` — models in memory with their steps and learning rates.

Every checkpoint must have the same architecture (compared by ``config.json`` for a
directory, by parameter names and shapes once loaded), else :class:`ConfigError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from influscope.errors import ConfigError, DataError

__all__ = [
    "Trajectory",
    "TrajectoryCheckpoint",
    "check_same_architecture",
    "from_directory",
    "from_models",
    "from_train_result",
    "load_trajectory",
]

_STEP = re.compile(r"^checkpoint[-_](\d+)$")
#: config.json keys that do not describe the architecture.
_BOOKKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


@dataclass
class TrajectoryCheckpoint:
    """One checkpoint of a run.

    Attributes:
        step: Optimizer steps taken when it was saved.
        lr: Mean learning rate of the steps since the previous checkpoint (the segment's η̄).
        load: Returns the model at this checkpoint (eval mode).
        name: Where it came from (a folder name, ``"step-<n>"``), for messages.
    """

    step: int
    lr: float
    load: Callable[[], nn.Module]
    name: str = ""


class Trajectory:
    """Checkpoints of one run sorted by step, with segment lengths ``K_ℓ = s_ℓ − s_{ℓ−1}``.

    Raises:
        DataError: No checkpoints, two with the same step, a negative step or a learning
            rate that is not positive.
    """

    def __init__(self, checkpoints: Sequence[TrajectoryCheckpoint], start_step: int = 0) -> None:
        if not checkpoints:
            raise DataError(
                "A trajectory needs at least one checkpoint, received 0. Train with "
                "checkpoint_every=... or point to a Trainer output_dir holding checkpoint-<step>/ "
                "folders."
            )
        ordered = sorted(checkpoints, key=lambda c: c.step)
        steps = [c.step for c in ordered]
        if len(set(steps)) != len(steps):
            raise DataError(f"Two checkpoints share a step: steps {steps}. Give each its own step.")
        if steps[0] <= start_step:
            raise DataError(
                f"Checkpoint steps must exceed the run's start step {start_step}; received {steps}."
            )
        bad = [c.name or c.step for c in ordered if not c.lr > 0]
        if bad:
            raise DataError(
                f"Checkpoints {bad} have a learning rate ≤ 0 (or NaN). Pass the run's learning "
                "rates (lr= / mean_lrs=)."
            )
        self.checkpoints = ordered
        self.start_step = start_step

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self):
        return iter(self.checkpoints)

    def __getitem__(self, i: int) -> TrajectoryCheckpoint:
        return self.checkpoints[i]

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def segment_lengths(self) -> list[int]:
        """``K_ℓ``: steps from the previous checkpoint (the run's start for the first)."""
        prev = [self.start_step, *self.steps[:-1]]
        return [s - p for s, p in zip(self.steps, prev)]


def check_same_architecture(models: Sequence[nn.Module], names: Sequence[str] | None = None):
    """Raise :class:`ConfigError` unless every model has the same parameter names and shapes."""
    names = list(names) if names is not None else [f"checkpoint {i}" for i in range(len(models))]
    ref = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}
    for model, name in zip(models[1:], names[1:]):
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if shapes != ref:
            diff = sorted(set(ref.items()) ^ set(shapes.items()))[:4]
            raise ConfigError(
                f"Checkpoints of different architectures: {name} differs from {names[0]} in "
                f"parameters {diff}. All checkpoints must come from one training run of one "
                "model; remove the foreign checkpoint."
            )


def from_models(
    models: Sequence[nn.Module], steps: Sequence[int], lrs: Sequence[float] | float
) -> Trajectory:
    """A trajectory of models held in memory.

    Args:
        models: The model at each checkpoint.
        steps: The optimizer step of each.
        lrs: The mean learning rate of each segment (one number: the same for all).
    """
    lrs = [float(lrs)] * len(models) if isinstance(lrs, (int, float)) else list(lrs)
    if not len(models) == len(steps) == len(lrs):
        raise DataError(
            f"from_models needs one step and one learning rate per model: {len(models)} models, "
            f"{len(steps)} steps, {len(lrs)} learning rates."
        )
    if models:
        check_same_architecture(models)
    return Trajectory(
        [
            TrajectoryCheckpoint(int(s), float(lr), (lambda m=m: m.eval()), f"step-{s}")
            for m, s, lr in zip(models, steps, lrs)
        ]
    )


def from_train_result(
    checkpoints: Sequence,
    config,
    dtype: torch.dtype = torch.float64,
    mean_lrs: Sequence[float] | None = None,
) -> Trajectory:
    """A trajectory from :class:`influscope.training.Checkpoint` objects.

    Args:
        checkpoints: ``TrainResult.checkpoints`` of :func:`~influscope.training.train_lm`.
        config: The ``GPT2Config`` the run trained.
        dtype: dtype of the loaded models.
        mean_lrs: Exact mean learning rate of each segment; default: each checkpoint's own
            step's rate.
    """
    lrs = list(mean_lrs) if mean_lrs is not None else [c.lr for c in checkpoints]
    if len(lrs) != len(checkpoints):
        raise DataError(f"mean_lrs has {len(lrs)} values for {len(checkpoints)} checkpoints.")
    return Trajectory(
        [
            TrajectoryCheckpoint(
                c.step, float(lr), (lambda c=c: c.model(config).to(dtype).eval()), f"step-{c.step}"
            )
            for c, lr in zip(checkpoints, lrs)
        ]
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"Cannot read {path}: {err}.") from None


def _logged_lrs(folders: Sequence[Path], root: Path) -> list[tuple[int, float]]:
    """``(step, learning_rate)`` pairs of the newest ``trainer_state.json`` found."""
    for candidate in [root / "trainer_state.json", *(f / "trainer_state.json" for f in folders)][
        ::-1
    ]:
        if candidate.is_file():
            history = _read_json(candidate).get("log_history", [])
            pairs = [
                (int(e["step"]), float(e["learning_rate"]))
                for e in history
                if "step" in e and "learning_rate" in e
            ]
            if pairs:
                return sorted(pairs)
    return []


def from_directory(
    path: str | Path,
    lr: float | None = None,
    model_class=None,
    dtype: torch.dtype = torch.float64,
) -> Trajectory:
    """A trajectory from a Hugging Face Trainer ``output_dir`` (``checkpoint-<step>/`` folders).

    The step of a folder is the number in its name, else ``global_step`` of its
    ``trainer_state.json``. The learning rate of segment ``(s_{ℓ−1}, s_ℓ]`` is the mean of
    ``log_history``'s ``learning_rate`` entries logged in it (the nearest earlier entry when
    none is), or ``lr`` when given.

    Args:
        path: The directory.
        lr: One learning rate for every segment (overrides the logged ones).
        model_class: What loads a folder (default ``AutoModelForCausalLM``).
        dtype: dtype of the loaded models.

    Raises:
        DataError: No checkpoint folders, or a folder without a parsable step.
        ConfigError: Folders of different architectures, or no learning rates known.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"Checkpoint directory {root} does not exist.")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())
    if not folders:
        raise DataError(
            f"No checkpoint folders (sub-folders with a config.json) under {root}. Expected a "
            "Hugging Face Trainer output_dir with checkpoint-<step>/ folders."
        )
    steps: list[int] = []
    for folder in folders:
        match = _STEP.match(folder.name)
        state = folder / "trainer_state.json"
        if match:
            steps.append(int(match.group(1)))
        elif state.is_file() and "global_step" in _read_json(state):
            steps.append(int(_read_json(state)["global_step"]))
        else:
            raise DataError(
                f"Cannot tell the training step of {folder.name!r}: its name is not "
                "checkpoint-<step> and it has no trainer_state.json with global_step. Rename the "
                "folders checkpoint-<step> (the step order decides the segments)."
            )
    configs = [_read_json(f / "config.json") for f in folders]
    ref = {k: v for k, v in configs[0].items() if k not in _BOOKKEEPING}
    for folder, cfg in zip(folders[1:], configs[1:]):
        mine = {k: v for k, v in cfg.items() if k not in _BOOKKEEPING}
        if mine != ref:
            keys = sorted(k for k in set(ref) | set(mine) if ref.get(k) != mine.get(k))
            raise ConfigError(
                f"Checkpoints of different architectures: {folder.name} differs from "
                f"{folders[0].name} in config keys {keys}. All checkpoints must come from one "
                "training run; remove the foreign folder."
            )
    order = sorted(range(len(folders)), key=lambda i: steps[i])
    folders, steps = [folders[i] for i in order], [steps[i] for i in order]
    if lr is not None:
        lrs = [float(lr)] * len(folders)
    else:
        logged = _logged_lrs(folders, root)
        if not logged:
            raise ConfigError(
                f"No learning rates under {root}: no trainer_state.json log_history with "
                "learning_rate. Pass lr= (CLI: --lr), the run's (mean) learning rate."
            )
        lrs, prev = [], 0
        for s in steps:
            inside = [v for t, v in logged if prev < t <= s]
            earlier = [v for t, v in logged if t <= s] or [logged[0][1]]
            lrs.append(sum(inside) / len(inside) if inside else earlier[-1])
            prev = s
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class

    def loader(folder: Path):
        return lambda: model_class.from_pretrained(folder, torch_dtype=dtype).eval()

    return Trajectory(
        [TrajectoryCheckpoint(s, v, loader(f), f.name) for f, s, v in zip(folders, steps, lrs)]
    )


def load_trajectory(source, config=None, lrs=None, steps=None, **kwargs) -> Trajectory:
    """A :class:`Trajectory` from whichever source is given.

    Args:
        source: A :class:`Trajectory`; a directory (``str`` / ``Path``); a list of
            :class:`~influscope.training.Checkpoint` (needs ``config``); or a list of models
            (needs ``steps`` and ``lrs``).
    """
    if isinstance(source, Trajectory):
        return source
    if isinstance(source, (str, Path)):
        return from_directory(source, lr=lrs, **kwargs)
    items = list(source)
    if items and all(isinstance(m, nn.Module) for m in items):
        if steps is None or lrs is None:
            raise ConfigError(
                "A list of models needs steps= and lrs= (the optimizer step and the segment's "
                "mean learning rate of each)."
            )
        return from_models(items, steps, lrs)
    if items and all(hasattr(c, "state_dict") and hasattr(c, "step") for c in items):
        if config is None:
            raise ConfigError("train_lm checkpoints need config= (the run's GPT2Config).")
        return from_train_result(items, config, mean_lrs=lrs, **kwargs)
    raise DataError(
        "Checkpoints must be a Trajectory, a directory of checkpoint-<step>/ folders, a list "
        f"of train_lm Checkpoints or a list of models; received {type(source).__name__} of "
        f"{len(items)} items."
    )
