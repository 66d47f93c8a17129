"""(c) The same fit and scoring with Kronfluence, when it is importable."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.common import (
    START,
    Sizes,
    free_memory,
    log,
    peak_gib,
    rate,
    reset_peak,
    timed,
)


def kronfluence_available() -> str | None:
    """``None`` when Kronfluence imports, else the reason it does not."""
    try:
        import kronfluence  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"kronfluence is not importable ({type(exc).__name__}: {exc})"
    return None


def bench_kronfluence(
    model: torch.nn.Module,
    blocks: list[int],
    train,
    queries,
    s: Sizes,
    device: torch.device,
    amp: str | None,
    workdir: Path,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The same fit and scoring with Kronfluence (EK-FAC, rank-r queries, same blocks).

    Kronfluence wraps the model's modules in place, so this runs after influscope. Its
    measurement is the query's loss; its positive score means the training example lowers that
    loss, which is influscope's sign convention for ``log p(completion | prompt)``.
    """
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    from influscope.config import resolve_dtype

    tracked = [f"model.layers.{i}.mlp.{p}" for i in blocks for p in ("gate_proj", "up_proj")]
    tracked += [f"model.layers.{i}.mlp.down_proj" for i in blocks]

    class LMTask(Task):
        """Summed token cross-entropy; measurement = the query's completion loss."""

        def _loss(self, batch, model, sample: bool) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = logits.logits[:, :-1].float()
            logits = logits.reshape(-1, logits.shape[-1])
            labels = batch["labels"][:, 1:].reshape(-1)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    sampled = torch.multinomial(probs, num_samples=1).flatten()
                labels = torch.where(labels == -100, labels, sampled)
            return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            return self._loss(batch, model, sample)

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return self._loss(batch, model, False)

        def get_influence_tracked_modules(self) -> list[str]:
            return tracked

        def get_attention_mask(self, batch) -> torch.Tensor:
            return batch["attention_mask"]

    from benchmarks.common import ExampleRows as Rows

    amp_dtype = resolve_dtype(amp)
    task = LMTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="gpu_check",
        model=model,
        task=task,
        cpu=device.type == "cpu",
        disable_tqdm=True,
        output_dir=str(workdir),
        log_level=logging.WARNING,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    factor_args = FactorArguments(strategy="ekfac", amp_dtype=amp_dtype)
    score_args = ScoreArguments(
        query_gradient_low_rank=s.query_rank, amp_dtype=amp_dtype, damping_factor=None
    )
    train_ds, query_ds = Rows(train.examples), Rows(queries.examples)
    train_tokens = sum(int(e["attention_mask"].sum()) for e in train.examples)
    common = {
        "factors_name": "ekfac",
        "factor_args": factor_args,
        "overwrite_output_dir": True,
    }
    log(f"(c) Kronfluence: EK-FAC fit, {len(tracked)} layers")
    reset_peak(device)
    stages: dict[str, float] = {}
    _, stages["covariance"] = timed(
        device,
        lambda: analyzer.fit_covariance_matrices(
            dataset=train_ds, per_device_batch_size=s.batch_size, **common
        ),
    )
    log(f"    covariance done in {stages['covariance']:.1f} s")
    _, stages["eigendecomposition"] = timed(
        device, lambda: analyzer.perform_eigendecomposition(**common)
    )
    log(f"    eigendecomposition done in {stages['eigendecomposition']:.1f} s")
    _, stages["eigenvalues"] = timed(
        device,
        lambda: analyzer.fit_lambda_matrices(
            dataset=train_ds, per_device_batch_size=s.batch_size, **common
        ),
    )
    log(f"    eigenvalue refit done in {stages['eigenvalues']:.1f} s")
    fit_peak = peak_gib(device)
    t_fit = sum(stages.values())
    log(f"(c) Kronfluence: scoring {len(queries)} × {len(train)} pairs")
    reset_peak(device)
    _, t_score = timed(
        device,
        lambda: analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=query_ds,
            train_dataset=train_ds,
            per_device_query_batch_size=len(queries),
            per_device_train_batch_size=s.batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        ),
    )
    score_peak = peak_gib(device)
    pairs = len(queries) * len(train)
    log(f"    scoring done in {t_score:.1f} s ({pairs / t_score:,.1f} pairs/s)")
    loaded = analyzer.load_pairwise_scores("pairwise")
    pairwise = loaded["all_modules"].detach().float().cpu()
    figures = {
        "version": __import__("kronfluence").__version__,
        "tracked_layers": len(tracked),
        "fit": {
            "seconds": round(t_fit, 3),
            "tokens_per_s": rate(train_tokens, t_fit),
            "peak_gib": fit_peak,
            "stages": {
                k: {"seconds": round(v, 3), "tokens_per_s": rate(train_tokens, v)}
                for k, v in stages.items()
            },
        },
        "score": {
            "seconds": round(t_score, 3),
            "pairs_per_s": rate(pairs, t_score),
            "tokens_per_s": rate(train_tokens, t_score),
            "peak_gib": score_peak,
            "note": "includes query preconditioning and writing results to disk",
        },
        "scores_finite": bool(torch.isfinite(pairwise).all()),
    }
    return figures, pairwise


def kronfluence_stage(
    requested: bool,
    budget_s: float,
    ours: dict[str, Any],
    ours_scores: torch.Tensor | None,
    plan: dict[str, Any],
    model: torch.nn.Module,
    blocks: list[int],
    train,
    queries,
    s: Sizes,
    device: torch.device,
    amp: str | None,
    out: Path,
) -> dict[str, Any]:
    """(c): Kronfluence on the same blocks when asked for, importable and within the budget.

    Returns:
        The report's ``"kronfluence"`` entry (figures, or why it was skipped) and, when both
        libraries scored the same pairs, ``"spearman_vs_kronfluence"`` (mean over the queries).
    """
    result: dict[str, Any] = {}
    if not requested:
        result["kronfluence"] = {"skipped": "not requested (pass --kronfluence)"}
    elif (why := kronfluence_available()) is not None:
        result["kronfluence"] = {"skipped": why}
        log(f"(c) Kronfluence skipped: {why}")
    else:
        left = budget_s - (time.perf_counter() - START)
        needed = 1.3 * (
            ours["fit"]["seconds"] + ours["score"]["seconds"]
            if "fit" in ours
            else plan["estimated_chosen_s"]
        )
        if left < needed:
            why = f"{left:.0f} s left, Kronfluence estimated at {needed:.0f} s"
            result["kronfluence"] = {"skipped": why}
            log(f"(c) Kronfluence skipped: {why}")
        else:
            with tempfile.TemporaryDirectory(dir=out, prefix="kronfluence-") as work:
                try:
                    kron, kron_scores = bench_kronfluence(
                        model, blocks, train, queries, s, device, amp, Path(work)
                    )
                except Exception as exc:  # report, do not lose the influscope figures
                    log(f"(c) Kronfluence failed: {type(exc).__name__}: {exc}")
                    kron = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
                    kron_scores = None
            free_memory(device)
            result["kronfluence"] = kron
            if (
                kron_scores is not None
                and ours_scores is not None
                and kron_scores.shape == ours_scores.shape
            ):
                from influscope.metrics import spearman

                rho = [spearman(ours_scores[q], kron_scores[q]) for q in range(len(queries))]
                result["spearman_vs_kronfluence"] = sum(rho) / len(rho)
    return result
