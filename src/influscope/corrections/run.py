"""Run the corrections end to end: score each model with its own curvature, then combine.

    base model θ_0 ─┐
    checkpoints θ_k ─┼─ Influence(model).fit(train) → score(queries, train) ─▶ CORRECTIONS ─▶ (Q, N)
    fine-tuned θ_ft ─┘

Every model gets its own :class:`~influscope.Influence` (same task, tracked modules and encoded
data), its own curvature fitted on the candidate training sequences at its own parameters, and
its own stored stages under ``run_dir/<role>/`` (``base``, ``checkpoint-0``, …, ``final``), so a
rerun reuses what was computed and a changed model is refused as stale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from influscope.analyzer import Influence
from influscope.config import FitConfig, ScoreConfig
from influscope.corrections.config import CorrectionConfig
from influscope.corrections.dda import CORRECTIONS, REQUIREMENTS, CorrectionInputs
from influscope.errors import ConfigError
from influscope.storage import atomic_write_json, atomic_write_tensors, read_json, read_tensors
from influscope.tasks import EncodedDataset, Task


@dataclass
class CorrectionResult:
    """Corrected score matrices and the per-model scores they were built from.

    Attributes:
        scores: Variant name → ``(Q, N)`` float64 scores (higher = more credit).
        components: Model role (``base``, ``checkpoint-k``, ``final``) → its ``(Q, N)`` scores.
        self_influence: ``(N,)`` self-influence under the final model, when computed.
        train_indices: Global index of each of the ``N`` training sequences.
        config: The correction settings.
    """

    scores: dict[str, torch.Tensor]
    components: dict[str, torch.Tensor]
    train_indices: list[int]
    config: CorrectionConfig
    self_influence: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def top(self, variant: str, query: int, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` highest-scored training positions of a query under ``variant``."""
        row = self.scores[variant][query]
        _, idx = torch.topk(row, min(k, row.numel()))
        return [(int(i), float(row[i])) for i in idx]

    def save(self, directory: str | Path) -> Path:
        """Write ``scores.safetensors`` and ``meta.json`` (atomic writes) into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"variant/{k}": v.contiguous() for k, v in self.scores.items()}
        tensors |= {f"model/{k}": v.contiguous() for k, v in self.components.items()}
        if self.self_influence is not None:
            tensors["self_influence"] = self.self_influence.contiguous()
        # Copies: a variant may share memory with a component (plain is the final model's).
        tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}
        atomic_write_tensors(out / "scores.safetensors", tensors)
        atomic_write_json(
            out / "meta.json",
            {"config": self.config.to_dict(), "train_indices": self.train_indices, **self.extra},
        )
        return out

    @classmethod
    def load(cls, directory: str | Path) -> CorrectionResult:
        """Read a result written by :meth:`save`."""
        directory = Path(directory)
        tensors = read_tensors(directory / "scores.safetensors")
        meta = read_json(directory / "meta.json")
        config = CorrectionConfig.from_dict(meta.pop("config"))
        return cls(
            scores={k[8:]: v for k, v in tensors.items() if k.startswith("variant/")},
            components={k[6:]: v for k, v in tensors.items() if k.startswith("model/")},
            train_indices=meta.pop("train_indices"),
            config=config,
            self_influence=tensors.get("self_influence"),
            extra=meta,
        )


def model_scores(
    model: nn.Module,
    task: str | Task,
    train: EncodedDataset,
    queries: EncodedDataset,
    *,
    modules: str | Sequence[str] = "mlp",
    fit_config: FitConfig | None = None,
    score_config: ScoreConfig | None = None,
    run_dir: str | Path | None = None,
    self_influence: bool = False,
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Influence of ``train`` on ``queries`` under one model, with curvature fitted at it.

    Returns:
        ``(pairwise (Q, N) float64, self-influence (N,) or None)``.
    """
    score_config = dataclasses.replace(score_config or ScoreConfig(), normalize=None)
    inf = Influence(model, task, modules=modules, run_dir=run_dir, device=device)
    factors = inf.fit(train, fit_config or FitConfig(), overwrite=overwrite)
    scores = inf.score(
        queries,
        train,
        factors,
        score_config,
        name="scores" if run_dir is not None else None,
        overwrite=overwrite,
        self_influence=self_influence,
    )
    si = scores.self_influence
    if self_influence and si is None:  # a stored stage does not keep self-influence
        si = inf.self_influence(train, factors, score_config.batch_size)
    return scores.pairwise.double().cpu(), None if si is None else si.double().cpu()


def run_corrections(
    finetuned: nn.Module,
    task: str | Task,
    train: EncodedDataset,
    queries: EncodedDataset,
    *,
    base: nn.Module | None = None,
    checkpoints: Sequence[nn.Module] = (),
    config: CorrectionConfig | None = None,
    fit_config: FitConfig | None = None,
    score_config: ScoreConfig | None = None,
    modules: str | Sequence[str] = "mlp",
    run_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> CorrectionResult:
    """Score every model needed by ``config.variants`` and combine the scores.

    Args:
        finetuned: The model whose outputs are attributed (after fine-tuning).
        task: Task name or object (the same for every model).
        train: Candidate training sequences, encoded once with the shared tokenizer.
        queries: Queries (e.g. outputs to explain), encoded with the same tokenizer.
        base: The model before fine-tuning (needed by ``debias`` and ``dda``).
        checkpoints: Intermediate fine-tuning checkpoints, oldest first (needed by ``denoise``
            and ``dda``); the final model is appended as the last smoothed model.
        config: Variants and smoothing.
        fit_config: Curvature settings, used for every model.
        score_config: Score settings (``normalize`` is ignored: RelatIF is its own variant).
        modules: Tracked modules (the same names in every model).
        run_dir: Where each model's stages are stored (``run_dir/<role>``); ``None``: memory.
        device: Device of every pass.
        overwrite: Recompute stored stages.

    Returns:
        A :class:`CorrectionResult` with one ``(Q, N)`` matrix per variant.

    Raises:
        ConfigError: A variant's inputs are missing (e.g. ``dda`` without ``base``).
    """
    config = config or CorrectionConfig()
    needs = {need for variant in config.variants for need in REQUIREMENTS[variant]}
    if "base" in needs and base is None:
        raise ConfigError(
            f"Variants {list(config.variants)} need the base model (before fine-tuning); pass "
            "base=... (CLI: --base-model DIR) or drop 'debias'/'dda'."
        )
    if "checkpoints" in needs and not checkpoints:
        raise ConfigError(
            f"Variants {list(config.variants)} need intermediate fine-tuning checkpoints; pass "
            "checkpoints=[...] (CLI: --checkpoints DIR ...) or drop 'denoise'/'dda'."
        )
    smoothed = [*checkpoints, finetuned] if "checkpoints" in needs else []
    if config.weights is not None and smoothed and len(config.weights) != len(smoothed):
        raise ConfigError(
            f"{len(config.weights)} weights given for {len(smoothed)} smoothed models "
            f"({len(checkpoints)} checkpoints + the final model)."
        )

    def run(model: nn.Module, role: str, want_self: bool = False):
        return model_scores(
            model,
            task,
            train,
            queries,
            modules=modules,
            fit_config=fit_config,
            score_config=score_config,
            run_dir=None if run_dir is None else Path(run_dir) / role,
            self_influence=want_self,
            device=device,
            overwrite=overwrite,
        )

    components: dict[str, torch.Tensor] = {}
    final, self_inf = run(finetuned, "final", "self_influence" in needs)
    components["final"] = final
    if "checkpoints" in needs:
        for k, model in enumerate(checkpoints):
            components[f"checkpoint-{k}"] = run(model, f"checkpoint-{k}")[0]
    if "base" in needs:
        components["base"] = run(base, "base")[0]
    inputs = CorrectionInputs(
        finetuned=final,
        checkpoints=[components[f"checkpoint-{k}"] for k in range(len(checkpoints))] + [final]
        if "checkpoints" in needs
        else [],
        base=components.get("base"),
        self_influence=self_inf,
        weights=config.weights,
        smoothing=config.smoothing,
    )
    scores = {variant: CORRECTIONS[variant](inputs) for variant in config.variants}
    return CorrectionResult(
        scores=scores,
        components=components,
        train_indices=list(train.indices),
        config=config,
        self_influence=self_inf,
    )
