"""(b) influscope: EK-FAC fit (timed per stage), query preconditioning, pairwise scores."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from benchmarks.gpu.common import (
    Sizes,
    log,
    peak_gib,
    rate,
    reset_peak,
    timed,
)


@contextlib.contextmanager
def fit_stage_timers(device: torch.device) -> Iterator[dict[str, float]]:
    """Time the EK-FAC fit's stages by wrapping the functions the K-FAC/EK-FAC fitters call
    (``covariances`` and ``eigendecompose`` in :mod:`influscope.curvature.kfac`,
    ``eigenvalue_statistics`` in :mod:`influscope.curvature.ekfac`).

    Yields a dict that fills with ``covariance``, ``eigendecomposition`` and ``eigenvalues``
    seconds (device-synchronised). If the library's internals change, the dict stays empty and
    only the total fit time is reported.
    """
    import influscope.curvature.ekfac as ekfac_module
    import influscope.curvature.kfac as kfac_module

    times: dict[str, float] = {}
    names = {
        "covariances": "covariance",
        "eigendecompose": "eigendecomposition",
        "eigenvalue_statistics": "eigenvalues",
    }
    modules = {
        "covariances": kfac_module,
        "eigendecompose": kfac_module,
        "eigenvalue_statistics": ekfac_module,
    }
    saved = {n: getattr(modules[n], n) for n in names if hasattr(modules[n], n)}
    counts = {"eigendecomposition": 0}

    def wrap(attr: str, stage: str):
        inner = saved[attr]

        def wrapper(*args, **kwargs):
            if stage == "eigenvalues":
                log(
                    f"    eigendecompositions done ({counts['eigendecomposition']} matrices, "
                    f"{times.get('eigendecomposition', 0.0):.1f} s); eigenvalue refit pass"
                )
            result, seconds = timed(device, lambda: inner(*args, **kwargs))
            times[stage] = times.get(stage, 0.0) + seconds
            if stage == "covariance":
                log(f"    covariance pass done in {seconds:.1f} s; eigendecompositions")
            elif stage == "eigendecomposition":
                counts["eigendecomposition"] += 1
            else:
                log(f"    eigenvalue refit done in {seconds:.1f} s")
            return result

        return wrapper

    try:
        if len(saved) == len(names):
            for attr, stage in names.items():
                setattr(modules[attr], attr, wrap(attr, stage))
        yield times
    finally:
        for attr, fn in saved.items():
            setattr(modules[attr], attr, fn)


def bench_influscope(
    model: torch.nn.Module,
    blocks: list[int],
    train,
    queries,
    s: Sizes,
    device: torch.device,
    amp: str | None,
    stats_dtype: str,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Fit EK-FAC, precondition the queries and score them against the training data.

    Returns:
        ``(figures, pairwise scores on the CPU (Q, N))``.
    """
    from influscope import FitConfig, Influence, ScoreConfig

    patterns = [rf"^model\.layers\.{i}\.mlp\.(gate_proj|up_proj|down_proj)$" for i in blocks]
    inf = Influence(model, "causal_lm", modules=patterns, device=device)
    train_tokens = sum(int(e["attention_mask"].sum()) for e in train.examples)
    fit_cfg = FitConfig(
        curvature="ekfac", amp_dtype=amp, batch_size=s.batch_size, stats_dtype=stats_dtype
    )
    score_cfg = ScoreConfig(query_rank=s.query_rank, batch_size=s.batch_size, amp_dtype=amp)
    log(
        f"(b) influscope: EK-FAC fit on {len(train)} × {s.seq_len} tokens, {len(inf.layers)} layers"
    )
    reset_peak(device)
    with fit_stage_timers(device) as stages:
        op, t_fit = timed(device, lambda: inf.fit(train, fit_cfg))
    fit_peak = peak_gib(device)
    log(f"    fit done in {t_fit:.1f} s ({train_tokens / t_fit:,.0f} tokens/s)")
    stage_rows = {
        name: {"seconds": round(sec, 3), "tokens_per_s": rate(train_tokens, sec)}
        for name, sec in stages.items()
    }
    log(f"(b) influscope: preconditioning {len(queries)} queries (rank {s.query_rank})")
    reset_peak(device)
    pq, t_pre = timed(device, lambda: inf.precondition(queries, op, score_cfg))
    pre_peak = peak_gib(device)
    log(f"    query gradients done in {t_pre:.1f} s; scoring {len(queries)} × {len(train)} pairs")
    reset_peak(device)
    scores, t_score = timed(device, lambda: inf.score(pq, train, op, score_cfg))
    score_peak = peak_gib(device)
    pairs = len(queries) * len(train)
    log(f"    scoring done in {t_score:.1f} s ({pairs / t_score:,.1f} pairs/s)")
    pairwise = scores.pairwise.detach().float().cpu()
    figures = {
        "tracked_layers": len(inf.layers),
        "tracked_parameters": sum(layer.numel for layer in inf.layers),
        "fit_config": fit_cfg.to_dict(),
        "score_config": score_cfg.to_dict(),
        "fit": {
            "seconds": round(t_fit, 3),
            "tokens_per_s": rate(train_tokens, t_fit),
            "peak_gib": fit_peak,
            "stages": stage_rows,
        },
        "precondition": {
            "seconds": round(t_pre, 3),
            "queries_per_s": rate(len(queries), t_pre),
            "peak_gib": pre_peak,
        },
        "score": {
            "seconds": round(t_score, 3),
            "pairs_per_s": rate(pairs, t_score),
            "tokens_per_s": rate(train_tokens, t_score),
            "peak_gib": score_peak,
        },
        "scores_finite": bool(torch.isfinite(pairwise).all()),
    }
    return figures, pairwise  # the caller frees the device memory
