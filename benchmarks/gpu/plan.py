"""Calibration: time the per-block costs and choose how many blocks fit the budget."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from benchmarks.gpu.common import (
    Sizes,
    timed,
)


def calibrate(
    s: Sizes, model: torch.nn.Module, train, device: torch.device, amp: torch.dtype | None
) -> dict[str, float]:
    """Time the costs that scale with the number of tracked blocks, and one model step.

    Returns seconds for: ``eigh_hidden`` / ``eigh_intermediate`` (float64 ``eigh`` of one
    factor), ``svd_query`` (the rank-``query_rank`` SVD influscope takes of one
    ``(intermediate, hidden)`` float32 query gradient: randomized on these widths),
    ``layer_batch`` (one layer's covariance + rotated-gradient products for one batch), and
    ``model_step`` (forward + backward of the whole model on one batch).
    """
    from influscope.linalg import low_rank
    from influscope.tasks import CausalLMTask

    out: dict[str, float] = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    warm = torch.randn(64, 48, generator=g).to(device)  # cusolver handles, kernels
    torch.linalg.eigh(warm.double() @ warm.double().t())
    torch.linalg.svd(warm[None], full_matrices=False)
    for key, n in (("eigh_hidden", s.hidden), ("eigh_intermediate", s.intermediate)):
        x = torch.randn(n, n, generator=g, dtype=torch.float64).to(device)
        m = x @ x.t() / n
        _, out[key] = timed(device, lambda m=m: torch.linalg.eigh(m))
    b = min(2, s.n_queries)
    p = torch.randn(b, s.intermediate, s.hidden, generator=g).to(device)
    _, t = timed(device, lambda: low_rank(p, s.query_rank, "auto"))
    out["svd_query"] = t / b
    tokens = s.batch_size * s.seq_len
    a = torch.randn(tokens, s.hidden, generator=g).to(device)
    gs = torch.randn(tokens, s.intermediate, generator=g).to(device)
    qa = torch.linalg.qr(torch.randn(s.hidden, s.hidden, generator=g))[0].to(device)
    qs = torch.linalg.qr(torch.randn(s.intermediate, s.intermediate, generator=g))[0].to(device)

    def layer_batch() -> torch.Tensor:
        cov = (a.t() @ a).sum() + (gs.t() @ gs).sum()
        ra = (a @ qa).view(s.batch_size, s.seq_len, -1)
        rs = (gs @ qs).view(s.batch_size, s.seq_len, -1)
        rot = torch.einsum("bto,bti->boi", rs, ra)
        return cov + rot.square().sum()

    layer_batch()
    _, out["layer_batch"] = timed(device, layer_batch)
    task = CausalLMTask()
    batch = {k: v.to(device) for k, v in task.collate(train.examples[: s.batch_size]).items()}
    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()

    def step() -> None:
        x = model.get_input_embeddings().weight
        x.requires_grad_(True)
        with ctx:
            loss = task.training_loss(model, batch).sum()
        loss.backward()
        x.requires_grad_(False)
        x.grad = None

    step()
    _, out["model_step"] = timed(device, step)
    return out


def plan_blocks(
    s: Sizes, cal: dict[str, float], budget_s: float, forced: int | None
) -> tuple[list[int], dict[str, Any]]:
    """Choose evenly spaced blocks whose estimated influscope time fits ``budget_s``.

    Returns:
        ``(block indices, plan)`` where ``plan`` holds the estimates and the reason.
    """
    n_train_batches = math.ceil(s.n_train / s.batch_size)
    n_query_batches = math.ceil(s.n_queries / s.batch_size)
    # fit: covariance + eigenvalue passes; scoring: query pass + training pass
    fixed = cal["model_step"] * (3 * n_train_batches + n_query_batches)
    per_block = 3 * (
        cal["eigh_hidden"]
        + cal["eigh_intermediate"]
        + s.n_queries * cal["svd_query"]
        + 3 * n_train_batches * cal["layer_batch"]
    )
    per_block *= 1.5  # margin for what the estimate leaves out (hooks, copies, allocator)
    fit_all = math.floor(max(budget_s - fixed, 0.0) / per_block)
    if forced is not None:
        n = max(1, min(forced, s.layers))
        reason = f"--blocks {forced}"
    elif fit_all >= s.layers:
        n = s.layers
        reason = "all blocks fit the time budget"
    else:
        n = max(1, fit_all)
        reason = (
            f"EK-FAC of all {s.layers} blocks is estimated at {fixed + s.layers * per_block:.0f} s, "
            f"over this stage's budget of {budget_s:.0f} s; tracking {n} evenly spaced blocks"
        )
    blocks = sorted({round(i * (s.layers - 1) / max(n - 1, 1)) for i in range(n)})
    if n == 1:
        blocks = [s.layers // 2]
    plan = {
        "budget_s": round(budget_s, 1),
        "estimated_fixed_s": round(fixed, 1),
        "estimated_per_block_s": round(per_block, 2),
        "estimated_all_blocks_s": round(fixed + s.layers * per_block, 1),
        "estimated_chosen_s": round(fixed + len(blocks) * per_block, 1),
        "reason": reason,
    }
    return blocks, plan
