"""(d) The report: versions and device, and the markdown table of the measurements."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from benchmarks.gpu.common import Sizes
from benchmarks.gpu.model import llama_parameter_count


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown section with one table per measurement."""
    env, model, data = report["environment"], report["model"], report["data"]
    tests = report["cuda_tests"]
    lines = [
        f"GPU check run {report['date']} on **{env['device_name']}** "
        f"(torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}); "
        f"{'**quick mode** (tiny sizes), ' if report['quick'] else ''}"
        f"total {report['total_seconds']:.0f} s.",
        "",
        (
            f"CUDA tests (`{tests['command']}`): **{tests.get('status')}** — "
            f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
            f"{tests.get('errors', 0)} errors, {tests.get('skipped', 0)} skipped "
            f"({tests.get('seconds', 0)} s)."
            if "command" in tests
            else f"CUDA tests: {tests.get('status')}."
        ),
        "",
        f"Model: Llama from `LlamaConfig` with random weights, {model['parameters']:,} parameters "
        f"(hidden {model['hidden']}, intermediate {model['intermediate']}, {model['layers']} "
        f"layers, vocabulary {model['vocab']}), {model['dtype']}, autocast {model['amp_dtype']}. "
        f"Tracked: MLP projections of blocks {model['tracked_blocks']} "
        f"({len(model['tracked_blocks'])} of {model['layers']}; {model['plan']['reason']}). "
        f"Data: {data['n_train']} × {data['seq_len']} random tokens, {data['n_queries']} queries "
        f"(completion = second half), query rank {data['query_rank']}, batch {data['batch_size']}.",
        "",
        "| stage | library | seconds | throughput | peak GPU memory (GiB) |",
        "|---|---|---:|---:|---:|",
    ]
    failures = []
    for lib in ("influscope", "kronfluence"):
        fig = report.get(lib) or {}
        if "failed" in fig:
            failures.append(f"{lib}: **failed** — {fig['failed']} (traceback in the JSON).")
        if "fit" not in fig:
            continue
        for stage, row in fig["fit"].get("stages", {}).items():
            lines.append(
                f"| fit: {stage} | {lib} | {_fmt(row['seconds'])} | "
                f"{_fmt(row['tokens_per_s'], 0)} tokens/s | |"
            )
        lines.append(
            f"| fit: total | {lib} | {_fmt(fig['fit']['seconds'])} | "
            f"{_fmt(fig['fit']['tokens_per_s'], 0)} tokens/s | {_fmt(fig['fit']['peak_gib'], 2)} |"
        )
        if "precondition" in fig:
            pre = fig["precondition"]
            lines.append(
                f"| query gradients (rank {data['query_rank']}) | {lib} | {_fmt(pre['seconds'])} "
                f"| {_fmt(pre['queries_per_s'], 2)} queries/s | {_fmt(pre['peak_gib'], 2)} |"
            )
        sc = fig["score"]
        lines.append(
            f"| pairwise scores | {lib} | {_fmt(sc['seconds'])} | "
            f"{_fmt(sc['pairs_per_s'], 1)} pairs/s | {_fmt(sc['peak_gib'], 2)} |"
        )
    lines += ["", *failures] if failures else []
    lines.append("")
    plan = model["plan"]
    lines.append(
        f"Calibration (seconds): {', '.join(f'{k} {v:.3g}' for k, v in report['calibration'].items())}. "
        f"Estimated influscope time for all {model['layers']} blocks: "
        f"{plan['estimated_all_blocks_s']} s (per block {plan['estimated_per_block_s']} s)."
    )
    kron = report.get("kronfluence")
    if kron and "skipped" in kron:
        lines.append(f"Kronfluence: skipped ({kron['skipped']}).")
    if report.get("spearman_vs_kronfluence") is not None:
        lines.append(
            "Mean Spearman between influscope and Kronfluence scores per query: "
            f"{report['spearman_vs_kronfluence']:.3f} (random weights; the Fisher's sampled "
            "labels differ between the libraries)."
        )
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device's name."""
    import transformers

    import influscope

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": str(device),
        "device_name": name or "cpu",
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "influscope": influscope.__version__,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
    }


def model_section(
    s: Sizes,
    n_params: int,
    model_dtype: torch.dtype,
    amp: str | None,
    build_seconds: float,
    blocks: list[int],
    plan: dict[str, Any],
) -> dict[str, Any]:
    """The report's ``"model"`` entry: sizes, parameter counts, dtypes and the tracked blocks."""
    return {
        "architecture": "LlamaForCausalLM (random weights, from LlamaConfig)",
        "hidden": s.hidden,
        "intermediate": s.intermediate,
        "layers": s.layers,
        "heads": s.heads,
        "kv_heads": s.kv_heads,
        "vocab": s.vocab,
        "parameters": n_params,
        "parameters_formula": llama_parameter_count(s),
        "dtype": str(model_dtype).removeprefix("torch."),
        "amp_dtype": amp,
        "build_seconds": round(build_seconds, 2),
        "tracked_blocks": blocks,
        "plan": plan,
    }


def data_section(s: Sizes) -> dict[str, Any]:
    """The report's ``"data"`` entry."""
    return {
        "n_train": s.n_train,
        "seq_len": s.seq_len,
        "n_queries": s.n_queries,
        "train_tokens": s.n_train * s.seq_len,
        "query_rank": s.query_rank,
        "batch_size": s.batch_size,
    }
