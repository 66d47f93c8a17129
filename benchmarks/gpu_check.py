"""GPU check (issue 7): the CUDA test subset, then EK-FAC throughput on a ~1 B Llama.

One prepared script for a CUDA machine. It

a. runs ``pytest -m cuda tests/test_cuda.py`` in a subprocess (device placement, CPU/CUDA
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

Run:  .venv/bin/python benchmarks/gpu_check.py --out runs/gpu_check [--kronfluence]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

# Never download anything, and keep the library's progress bars out of the log.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import torch

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("influscope") is None:  # not installed: use the checkout
    sys.path.insert(0, str(REPO / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p
    )
T = TypeVar("T")
_START = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    """Model and data sizes of one benchmark run."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    n_train: int
    seq_len: int
    n_queries: int
    batch_size: int
    query_rank: int


#: ~1.1 B parameters (the TinyLlama shape), 256 × 512 training tokens, 16 queries.
FULL = Sizes(2048, 5632, 22, 32, 4, 32000, 256, 512, 16, 8, 32)
#: Runs end to end on a CPU in seconds.
QUICK = Sizes(64, 176, 3, 4, 2, 512, 16, 64, 4, 4, 8)


# --- small helpers ----------------------------------------------------------------------------
def log(msg: str) -> None:
    """Print a progress line with the time since the script started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), seconds)`` with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since :func:`reset_peak`, in GiB (``None`` on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def free_memory(device: torch.device) -> None:
    """Drop cached allocations so that the next stage starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resolve_device(name: str | None) -> torch.device:
    """The benchmark's device: ``name``, else CUDA when available, else the CPU.

    A bare ``"cuda"`` gets the current device's index: ``torch.cuda.set_device`` refuses a CUDA
    device without one (``ValueError: Expected a torch.device with a specified index``).

    Raises:
        SystemExit: A CUDA device is asked for on a machine without CUDA.
    """
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"gpu_check: --device {name} asks for CUDA, but torch {torch.__version__} sees no "
                "CUDA device. Run on a CUDA machine, or pass --device cpu (with --quick)."
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def rate(amount: float, seconds: float | None) -> float | None:
    """``amount / seconds`` or ``None``."""
    return amount / seconds if seconds else None


# --- (a) the CUDA test subset -----------------------------------------------------------------
def stream_command(
    cmd: list[str], timeout_s: float, env: dict[str, str] | None = None, prefix: str = "    | "
) -> tuple[list[str], int | None, bool]:
    """Run ``cmd`` in its own process group, echoing its output, for at most ``timeout_s``.

    The whole group is killed at the deadline, and any of its processes left behind after the
    command exits: a grandchild (pytest's spawned NCCL ranks) inherits the output pipe, so
    killing only the child would leave the read blocked until a hung grandchild exits — the
    check would stall instead of reporting a timeout.

    Returns:
        ``(output lines, return code (None when killed at the deadline), deadline reached)``.
    """
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, killed as a whole
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # stream the output as progress
            lines.append(line.rstrip())
            print(f"{prefix}{line.rstrip()}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode: int | None = proc.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        returncode, timed_out = None, True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the deadline, or processes left behind
    proc.wait()
    reader.join(timeout=10)
    return lines, returncode, timed_out


def run_cuda_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``pytest -m cuda tests/test_cuda.py`` and summarise its JUnit report.

    Returns:
        ``{"status": passed|failed|skipped|timeout|error, "passed", "failed", "errors",
        "skipped", "seconds", "returncode", "tail"}``.
    """
    junit = out / "pytest_cuda.xml"
    junit.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests/test_cuda.py",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "--timeout=150",
        f"--junitxml={junit}",
    ]
    log(f"(a) running: {' '.join(cmd[2:])}")
    env = {**os.environ, "INFLUSCOPE_PROGRESS": "0"}
    t0 = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join(cmd[2:])}
    lines, returncode, timed_out = stream_command(cmd, timeout_s, env, prefix="    pytest | ")
    if timed_out:
        result.update(status="timeout", returncode=None)
        log(f"(a) cuda tests killed after {timeout_s:.0f} s")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["tail"] = lines[-15:]
    if "status" in result:
        return result
    result["returncode"] = returncode
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.is_file():
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for suite in suites:
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result.update(
        passed=passed, failed=counts["failures"], errors=counts["errors"], skipped=counts["skipped"]
    )
    if returncode == 0 and passed > 0:
        result["status"] = "passed"
    elif returncode == 0 and counts["skipped"] == counts["tests"]:
        result["status"] = "skipped"
    elif counts["failures"] or counts["errors"]:
        result["status"] = "failed"
    else:
        result["status"] = "error"
    log(
        f"(a) cuda tests: {result['status']} — {passed} passed, {counts['failures']} failed, "
        f"{counts['errors']} errors, {counts['skipped']} skipped in {result['seconds']} s"
    )
    return result


# --- (b) model and data -----------------------------------------------------------------------
def llama_parameter_count(s: Sizes) -> int:
    """Parameters of an untied Llama with these sizes (embedding + blocks + norm + head)."""
    head_dim = s.hidden // s.heads
    attn = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_heads * head_dim
    mlp = 3 * s.hidden * s.intermediate
    block = attn + mlp + 2 * s.hidden
    return s.vocab * s.hidden * 2 + s.layers * block + s.hidden


def build_llama(s: Sizes, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` from a config with random weights, built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        vocab_size=s.vocab,
        max_position_embeddings=max(2048, s.seq_len),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).eval()


def random_tokens(s: Sizes, n: int, seed: int, prompt_len: int = 0):
    """``n`` random sequences of ``seq_len`` tokens (the first ``prompt_len`` unlabelled)."""
    from influscope.tasks import EncodedDataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, s.vocab, (n, s.seq_len), generator=g)
    examples = []
    for row in ids:
        labels = row.clone()
        labels[:prompt_len] = -100
        examples.append(
            {
                "input_ids": row,
                "attention_mask": torch.ones(s.seq_len, dtype=torch.long),
                "labels": labels,
            }
        )
    return EncodedDataset(examples)


# --- calibration: how many blocks fit the budget ----------------------------------------------
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


# --- (b) influscope ---------------------------------------------------------------------------
@contextlib.contextmanager
def fit_stage_timers(device: torch.device) -> Iterator[dict[str, float]]:
    """Time the EK-FAC fit's stages by wrapping the functions :mod:`influscope.curvature.fit` calls.

    Yields a dict that fills with ``covariance``, ``eigendecomposition`` and ``eigenvalues``
    seconds (device-synchronised). If the library's internals change, the dict stays empty and
    only the total fit time is reported.
    """
    import influscope.curvature.fit as fit_module

    times: dict[str, float] = {}
    names = {
        "covariances": "covariance",
        "eigendecompose": "eigendecomposition",
        "eigenvalue_statistics": "eigenvalues",
    }
    saved = {n: getattr(fit_module, n) for n in names if hasattr(fit_module, n)}
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
                setattr(fit_module, attr, wrap(attr, stage))
        yield times
    finally:
        for attr, fn in saved.items():
            setattr(fit_module, attr, fn)


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


# --- (c) Kronfluence --------------------------------------------------------------------------
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

    class Rows(torch.utils.data.Dataset):
        def __init__(self, examples: list[dict[str, torch.Tensor]]) -> None:
            self.examples = examples

        def __len__(self) -> int:
            return len(self.examples)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return self.examples[i]

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


# --- (d) the report ---------------------------------------------------------------------------
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
    remaining = args.budget_s - (time.perf_counter() - _START)
    # conservative shares: the estimate leaves out allocator, hook and copy costs
    share = remaining * (0.35 if want_kron else 0.6)
    blocks, plan = plan_blocks(sizes, cal, share, args.blocks)
    log(f"(b) tracking blocks {blocks}: {plan['reason']}")
    log(
        f"    estimated {plan['estimated_chosen_s']} s for influscope "
        f"(all {sizes.layers} blocks: {plan['estimated_all_blocks_s']} s)"
    )
    report["calibration"] = {k: round(v, 4) for k, v in cal.items()}
    report["model"] = {
        "architecture": "LlamaForCausalLM (random weights, from LlamaConfig)",
        "hidden": sizes.hidden,
        "intermediate": sizes.intermediate,
        "layers": sizes.layers,
        "heads": sizes.heads,
        "kv_heads": sizes.kv_heads,
        "vocab": sizes.vocab,
        "parameters": n_params,
        "parameters_formula": n_expected,
        "dtype": str(model_dtype).removeprefix("torch."),
        "amp_dtype": amp,
        "build_seconds": round(t_build, 2),
        "tracked_blocks": blocks,
        "plan": plan,
    }
    report["data"] = {
        "n_train": sizes.n_train,
        "seq_len": sizes.seq_len,
        "n_queries": sizes.n_queries,
        "train_tokens": sizes.n_train * sizes.seq_len,
        "query_rank": sizes.query_rank,
        "batch_size": sizes.batch_size,
    }

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
    if not args.kronfluence:
        report["kronfluence"] = {"skipped": "not requested (pass --kronfluence)"}
    elif (why := kronfluence_available()) is not None:
        report["kronfluence"] = {"skipped": why}
        log(f"(c) Kronfluence skipped: {why}")
    else:
        left = args.budget_s - (time.perf_counter() - _START)
        needed = 1.3 * (
            ours["fit"]["seconds"] + ours["score"]["seconds"]
            if "fit" in ours
            else plan["estimated_chosen_s"]
        )
        if left < needed:
            why = f"{left:.0f} s left, Kronfluence estimated at {needed:.0f} s"
            report["kronfluence"] = {"skipped": why}
            log(f"(c) Kronfluence skipped: {why}")
        else:
            with tempfile.TemporaryDirectory(dir=out, prefix="kronfluence-") as work:
                try:
                    kron, kron_scores = bench_kronfluence(
                        model, blocks, train, queries, sizes, device, amp, Path(work)
                    )
                except Exception as exc:  # report, do not lose the influscope figures
                    log(f"(c) Kronfluence failed: {type(exc).__name__}: {exc}")
                    kron = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
                    kron_scores = None
            free_memory(device)
            report["kronfluence"] = kron
            if (
                kron_scores is not None
                and ours_scores is not None
                and kron_scores.shape == ours_scores.shape
            ):
                from influscope.evaluation.metrics import spearman

                rho = [spearman(ours_scores[q], kron_scores[q]) for q in range(len(queries))]
                report["spearman_vs_kronfluence"] = sum(rho) / len(rho)

    # (d) write
    report["total_seconds"] = round(time.perf_counter() - _START, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text("# GPU check\n\n" + markdown(report))
    log(f"(d) wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    print(markdown(report), flush=True)
    status = report["cuda_tests"].get("status")
    return 1 if status in ("failed", "error", "timeout") or "failed" in ours else 0


if __name__ == "__main__":
    sys.exit(main())
