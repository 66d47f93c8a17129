"""GPU check (issue 7): the CUDA test subset, then EK-FAC throughput on a ~1 B Llama.

One prepared script for a CUDA machine. It

a. runs ``pytest -m cuda tests/device/test_cuda.py`` in a subprocess (device placement, CPU/CUDA
   agreement, bf16 autocast agreement, offload, NCCL with two GPUs) and records the outcome;
b. builds a Llama-architecture model from a ``LlamaConfig`` with random weights (hidden 2048,
   intermediate 5632, 22 layers, 32 heads / 4 KV heads, vocabulary 32000: 1.1 B parameters, the
   TinyLlama shape) in bfloat16 — nothing is downloaded — tracks the MLP projections of some or
   all blocks, and measures with influscope: EK-FAC fitting (covariance pass, eigendecompositions,
   eigenvalue refit; tokens/s each), query preconditioning (rank-32 query gradients), pairwise
   scoring (pairs/s), and peak GPU memory per stage;
c. with ``--kronfluence`` (when importable) measures the same with Kronfluence;
d. writes ``gpu_check.json`` and ``gpu_check.md`` (a markdown table) into ``--out`` — also when
   a stage fails (its error and traceback are recorded; the exit status is then 1).

It must finish in under 8 minutes on one H200. Before the runs it times the per-block costs
that do not depend on the data size (float64 ``eigh`` of the factors, float32 SVD of the query
gradients, the per-layer statistics products) and tracks only as many evenly spaced blocks as
fit the time budget; the output says how many and why, and extrapolates to all blocks.

``--quick`` uses a tiny Llama and tiny data so that everything runs end to end on a CPU in well
under two minutes (the CUDA tests are then skipped); use it to check the script itself.

Run:  .venv/bin/python -m benchmarks.gpu_check --out runs/gpu_check [--kronfluence]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

# Never download anything, and keep the library's progress bars out of the log.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import torch

from benchmarks.gpu.common import FULL, QUICK, START, free_memory, log, resolve_device, timed
from benchmarks.gpu.cuda_tests import run_cuda_tests, stream_command
from benchmarks.gpu.influscope_stage import bench_influscope
from benchmarks.gpu.kronfluence_stage import kronfluence_available, kronfluence_stage
from benchmarks.gpu.model import build_llama, llama_parameter_count, random_tokens
from benchmarks.gpu.plan import calibrate, plan_blocks
from benchmarks.gpu.report import data_section, environment, markdown, model_section

if importlib.util.find_spec("influscope") is None:  # neither installed nor on PYTHONPATH
    raise SystemExit(
        "gpu_check: influscope is not importable. Install the checkout (pip install -e .) or "
        "run from the repository root with PYTHONPATH=src."
    )

__all__ = ["main", "parse_args", "resolve_device", "stream_command"]


# --- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "GPU check (issue 7): run the CUDA tests, then measure EK-FAC fitting and scoring "
            "throughput and peak memory on a ~1.1 B-parameter Llama with random weights "
            "(no download); writes gpu_check.json and gpu_check.md."
        )
    )
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="output directory")
    p.add_argument(
        "--quick", action="store_true", help="tiny model and data: runs on a CPU in seconds"
    )
    p.add_argument(
        "--kronfluence", action="store_true", help="also benchmark Kronfluence, if importable"
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--blocks", type=int, default=None, help="track this many blocks (default: fit the budget)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="wall-clock budget of the whole script in seconds (default 420, under 8 minutes)",
    )
    p.add_argument("--skip-tests", action="store_true", help="do not run the CUDA test subset")
    p.add_argument("--n-train", type=int, default=None, help="training sequences")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--n-queries", type=int, default=None, help="queries")
    p.add_argument(
        "--stats-dtype",
        choices=("float32", "float64"),
        default=None,
        help="covariance accumulation dtype (default: float32 on cuda, float64 on cpu)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if args.quick else FULL
    overrides = {"n_train": args.n_train, "seq_len": args.seq_len, "n_queries": args.n_queries}
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    device = resolve_device(args.device)
    stats_dtype = args.stats_dtype or ("float32" if device.type == "cuda" else "float64")
    model_dtype, amp = torch.bfloat16, "bfloat16"
    log(f"gpu_check: device {device}, {'quick' if args.quick else 'full'} sizes, out {out}")

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "sizes": asdict(sizes),
    }
    # (a) tests first, before this process allocates device memory
    if args.skip_tests:
        report["cuda_tests"] = {"status": "not run (--skip-tests)"}
    else:
        report["cuda_tests"] = run_cuda_tests(out, timeout_s=min(180.0, 0.4 * args.budget_s))

    if device.type == "cuda":
        torch.cuda.set_device(device)
    report["environment"] = environment(device)
    log(f"device: {report['environment']['device_name']}")

    # (b) model, data, calibration, plan
    n_expected = llama_parameter_count(sizes)
    log(
        f"(b) building Llama (hidden {sizes.hidden}, intermediate {sizes.intermediate}, "
        f"{sizes.layers} layers, vocab {sizes.vocab}): {n_expected:,} parameters expected"
    )
    model, t_build = timed(device, lambda: build_llama(sizes, device, model_dtype))
    model.requires_grad_(False)  # a model under study; the tracked weights are enabled per pass
    n_params = sum(p.numel() for p in model.parameters())
    log(f"    built in {t_build:.1f} s: {n_params:,} parameters ({n_params / 1e9:.2f} B), bf16")
    train = random_tokens(sizes, sizes.n_train, seed=1)
    queries = random_tokens(sizes, sizes.n_queries, seed=2, prompt_len=sizes.seq_len // 2)
    log("(b) calibrating per-block costs (eigh, query SVD, statistics products, model step)")
    cal = calibrate(sizes, model, train, device, torch.bfloat16)
    free_memory(device)
    log("    " + ", ".join(f"{k} {v:.3g} s" for k, v in cal.items()))
    want_kron = args.kronfluence and kronfluence_available() is None
    remaining = args.budget_s - (time.perf_counter() - START)
    # conservative shares: the estimate leaves out allocator, hook and copy costs
    share = remaining * (0.35 if want_kron else 0.6)
    blocks, plan = plan_blocks(sizes, cal, share, args.blocks)
    log(f"(b) tracking blocks {blocks}: {plan['reason']}")
    log(
        f"    estimated {plan['estimated_chosen_s']} s for influscope "
        f"(all {sizes.layers} blocks: {plan['estimated_all_blocks_s']} s)"
    )
    report["calibration"] = {k: round(v, 4) for k, v in cal.items()}
    report["model"] = model_section(sizes, n_params, model_dtype, amp, t_build, blocks, plan)
    report["data"] = data_section(sizes)

    ours_scores: torch.Tensor | None
    try:
        ours, ours_scores = bench_influscope(
            model, blocks, train, queries, sizes, device, amp, stats_dtype
        )
    except Exception as exc:  # keep going: the written report is what a GPU session brings back
        log(f"(b) influscope failed: {type(exc).__name__}: {exc}")
        ours = {
            "failed": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc().splitlines()[-30:],
        }
        ours_scores = None
    free_memory(device)
    report["influscope"] = ours

    # (c) Kronfluence
    report.update(
        kronfluence_stage(
            args.kronfluence,
            args.budget_s,
            ours,
            ours_scores,
            plan,
            model,
            blocks,
            train,
            queries,
            sizes,
            device,
            amp,
            out,
        )
    )

    # (d) write
    report["total_seconds"] = round(time.perf_counter() - START, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text("# GPU check\n\n" + markdown(report))
    log(f"(d) wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    print(markdown(report), flush=True)
    status = report["cuda_tests"].get("status")
    return 1 if status in ("failed", "error", "timeout") or "failed" in ours else 0


if __name__ == "__main__":
    sys.exit(main())
