"""Issue 22 item 3: a 1.1 B-parameter Llama on the 24 GB, 2-core CPU machine, under a budget.

The job: the TinyLlama shape (hidden 2048, intermediate 5632, 22 blocks, 32 heads / 4 KV heads,
vocabulary 32000; ``benchmarks/gpu/common.py``'s ``FULL``) with random weights built from a
config in float32 (4.4 GB), EK-FAC over the MLP projections of every block (66 layers), fitted
on 32 sequences × 256 tokens of real text, then rank-32 scores of 4 queries, all under
``--memory-gb`` (default 20). The text is Shakespeare (``make assets``), one token per byte
(ids ``3 + byte``: the model has random weights, so any tokenizer serves; bytes need none).

EK-FAC's statistics of all 66 layers do not fit that budget together (≈ 19 GB of float64
covariances + 25 GB of float64 factors), so the fit runs in module partitions
(:mod:`influscope.curvature.run`) and the score stage streams the factors from disk one layer
at a time (:class:`influscope.curvature.streamed.StreamedOperator`).

Stages, each in a child process whose peak resident size (``VmHWM``, polled by this process
every half second, so a child killed for memory or time still has one) and wall time are
recorded; ``RUN/llama_1b.json`` is written after every stage, and a rerun skips the finished
stages (the fit itself resumes from its finished partitions and shards):

1. ``dry-run``: ``influscope fit --dry-run``'s estimate (one timed batch, the plan's module
   partitions) and the score stage's, recorded as the prediction;
2. ``fit``: ``Influence.fit`` under the budget (stored under ``RUN/influscope``);
3. ``score``: ``Influence.score`` with ``query_rank=32`` (factors streamed);
4. with ``--peer kronfluence``: Kronfluence 1.0.1 on the same job (EK-FAC over the same
   layers, rank-32 queries), stopped at ``--time-limit``; it records its stages' times and
   peak, or where it ran out of time or memory.

Run (the full job, ≈ 1 h of CPU; ``nohup`` it)::

    PYTHONPATH=src:. OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.llama_1b \\
        --run runs/llama_1b --memory-gb 20 --threads 2 [--peer kronfluence --time-limit 3600]

Smoke test (seconds)::

    PYTHONPATH=src:. .venv/bin/python -m benchmarks.llama_1b --run /tmp/l1b --quick \\
        --blocks 2 --sequences 4 --tokens 32 --memory-gb 4 --peer kronfluence
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("INFLUSCOPE_PROGRESS_SECONDS", "60")  # a progress line a minute per log

REPO = Path(__file__).resolve().parents[1]
STAGES = ("dry-run", "fit", "score")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/llama_1b", help="Run directory (resumed when rerun).")
    p.add_argument("--memory-gb", type=float, default=20.0, help="The budget (GiB).")
    p.add_argument("--sequences", type=int, default=32, help="Training sequences.")
    p.add_argument("--tokens", type=int, default=256, help="Tokens per sequence.")
    p.add_argument("--queries", type=int, default=4, help="Query sequences.")
    p.add_argument("--rank", type=int, default=32, help="Rank of the query gradients.")
    p.add_argument("--blocks", type=int, default=None, help="Blocks (default: all 22).")
    p.add_argument("--batch-size", type=int, default=8, help="Fit and score batch size.")
    p.add_argument("--partitions", type=int, default=None, help="Force a partition count.")
    p.add_argument("--quick", action="store_true", help="A tiny Llama (smoke test).")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each child.")
    p.add_argument("--peer", choices=["kronfluence"], default=None, help="Also run a peer.")
    p.add_argument("--time-limit", type=float, default=3600.0, help="Seconds for the peer.")
    p.add_argument("--redo", nargs="*", default=[], help="Stages to rerun although recorded.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the job (in a child) ---------------------------------------------------------------------
def sizes(args: argparse.Namespace):
    from benchmarks.gpu.common import FULL, QUICK

    base = QUICK if args.quick else FULL
    return replace(
        base,
        layers=args.blocks or base.layers,
        n_train=args.sequences,
        seq_len=args.tokens,
        n_queries=args.queries,
        batch_size=args.batch_size,
        query_rank=args.rank,
    )


def byte_windows(n: int, tokens: int, start: int):
    """``n`` windows of ``tokens`` bytes of the Shakespeare corpus from window ``start`` on, as
    an :class:`EncodedDataset` (ids ``3 + byte``, every token labelled)."""
    import torch

    from influscope.assets import shakespeare_texts
    from influscope.tasks import EncodedDataset

    texts = shakespeare_texts()
    raw = "\n".join(texts[k] for k in sorted(texts)).encode("utf-8")
    examples = []
    for i in range(start, start + n):
        chunk = raw[i * tokens : (i + 1) * tokens]
        ids = torch.tensor(list(chunk), dtype=torch.long) + 3
        examples.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        )
    return EncodedDataset(examples)


def build(args: argparse.Namespace):
    """The model (float32, random weights from a config), training data and queries."""
    import torch

    from benchmarks.gpu.model import build_llama

    torch.set_num_threads(args.threads)
    s = sizes(args)
    model = build_llama(s, torch.device("cpu"), torch.float32)
    train = byte_windows(s.n_train, s.seq_len, 0)
    queries = byte_windows(s.n_queries, s.seq_len, 10_000)  # far from the training windows
    return s, model, train, queries


def influence(args, model):
    from influscope import Influence

    return Influence(model, "causal_lm", modules="mlp", run_dir=Path(args.run) / "influscope")


def fit_config(args):
    from influscope import FitConfig

    return FitConfig(
        batch_size=args.batch_size, memory_gb=args.memory_gb, partitions=args.partitions
    )


def score_config(args):
    from influscope import ScoreConfig

    return ScoreConfig(query_rank=args.rank, batch_size=args.batch_size, memory_gb=args.memory_gb)


def stage_dry_run(args) -> dict[str, Any]:
    """The prediction: ``fit --dry-run``'s estimate and the score stage's."""
    from influscope.budget import plan_fit, plan_score
    from influscope.costs import measure_batch
    from influscope.resources import estimate

    _, model, train, queries = build(args)
    inf = influence(args, model)
    plan = plan_fit(inf.tracked, train, fit_config(args))
    # the score's batch, as Influence.score plans it with one layer's factors streamed
    layer_factors = max(
        8 * (la.in_dim**2 + la.out_dim**2 + la.in_dim * la.out_dim) for la in inf.layers
    )
    score_batch = plan_score(inf.tracked, train, len(queries), score_config(args), layer_factors)
    cost = measure_batch(inf.tracked, train, plan.batch_size, sample_seed=0)  # as the fit
    rows = estimate(
        inf,
        train,
        batch_size=plan.batch_size,
        n_queries=len(queries),
        cost=cost,
        memory_gb=args.memory_gb,
        partitions=plan.partitions,
        stream_factors=True,
        query_rank=args.rank,
        score_batch_size=score_batch,
    )
    fit_rows = [r for r in rows if r.stage.startswith("fit")]
    score_row = next(r for r in rows if r.stage == "score")
    return {
        "partitions": plan.n_partitions,
        "partition_ranges": [list(r) for r in plan.partitions],
        "batch_size": plan.batch_size,
        "score_batch_size": score_batch,
        "budget_gib": plan.budget / 2**30,
        "fit_peak_gib": max(r.memory for r in fit_rows) / 2**30,
        "fit_seconds": sum(r.seconds or 0.0 for r in fit_rows),
        "score_peak_gib": score_row.memory / 2**30,
        "factors_disk_gib": fit_rows[-1].disk / 2**30,
        "rows": [
            {
                "stage": r.stage,
                "memory_gib": r.memory / 2**30,
                "disk_gib": r.disk / 2**30,
                "seconds": r.seconds,
                "note": r.note,
            }
            for r in rows
        ],
        "measured_batch": {
            "resident_gib": cost.resident / 2**30,
            "batch_peak_gib": cost.batch_peak / 2**30,
            "seconds_pass": cost.seconds_pass,
            "seconds_eigh": cost.seconds_eigh,
        },
        "tracked_layers": len(inf.layers),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def stage_fit(args) -> dict[str, Any]:
    _, model, train, _queries = build(args)
    inf = influence(args, model)
    t0 = time.perf_counter()
    inf.fit(train, fit_config(args))
    plan = inf.last_fit_plan
    return {
        "seconds_in_fit": time.perf_counter() - t0,
        "partitions": plan.n_partitions if plan is not None else None,
        "batch_size": plan.batch_size if plan is not None else None,
        "shards": inf.last_fit_shards,
        "loaded_stored_stage": plan is None,
    }


def stage_score(args) -> dict[str, Any]:
    _, model, train, queries = build(args)
    inf = influence(args, model)
    factors = inf.load_factors(train)
    t0 = time.perf_counter()
    # computed, never loaded: this stage runs only when it is not recorded or is redone
    scores = inf.score(queries, train, factors, score_config(args), name="scores", overwrite=True)
    pairwise = scores.pairwise.float()
    return {
        "seconds_in_score": time.perf_counter() - t0,
        "streamed": type(factors).__name__ == "StreamedOperator",
        "batch_size": inf.last_score_batch,
        "layer_loads": len(getattr(factors, "loads", [])),
        "scores_finite": bool(pairwise.isfinite().all()),
        "top_train_per_query": pairwise.argmax(1).tolist(),
    }


def stage_kronfluence(args) -> dict[str, Any]:
    """Kronfluence 1.0.1 on the same job: EK-FAC over the same layers, rank-r queries."""
    import torch

    from benchmarks.gpu.kronfluence_stage import bench_kronfluence

    s, model, train, queries = build(args)
    work = Path(args.run) / "kronfluence"
    progress = Path(args.run) / "kronfluence_progress.json"

    def mark(stage: str) -> None:  # where it got to, should it be killed
        done = json.loads(progress.read_text()) if progress.exists() else []
        done.append({"stage": stage, "t": time.time()})
        progress.write_text(json.dumps(done))

    from benchmarks.gpu import kronfluence_stage as ks

    log = ks.log
    ks.log = lambda msg: (log(msg), mark(msg))
    progress.unlink(missing_ok=True)
    figures, pairwise = bench_kronfluence(
        model, list(range(s.layers)), train, queries, s, torch.device("cpu"), None, work
    )
    return figures | {"scores_finite": bool(torch.isfinite(pairwise).all())}


CHILDREN = {
    "dry-run": stage_dry_run,
    "fit": stage_fit,
    "score": stage_score,
    "kronfluence": stage_kronfluence,
}


# --- the parent: one child per stage, its wall time and peak ---------------------------------
def vm_hwm(pid: int) -> int | None:
    """``VmHWM`` of a live process in bytes, or ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_child(stage: str, argv: list[str], limit: float | None, log_path: Path) -> dict:
    """Run ``stage`` in a child; its wall time, peak (polled ``VmHWM``) and result or fate."""
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{REPO}")
    cmd = [sys.executable, "-m", "benchmarks.llama_1b", *argv, "--child", stage]
    peak = [0]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                hwm = vm_hwm(proc.pid)
                if hwm is not None:
                    peak[0] = max(peak[0], hwm)
                stop.wait(0.5)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            out, _ = proc.communicate(timeout=limit)
            status = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            status = f"out of time (stopped at the --time-limit of {limit:.0f} s)"
        stop.set()
        watcher.join()
    seconds = time.perf_counter() - t0
    if proc.returncode == -9 and not status.startswith("out of time"):
        status = "killed (SIGKILL: out of memory?)"
    result: dict[str, Any] = {}
    lines = [line for line in (out or "").splitlines() if line.startswith("{")]
    if status == "done" and lines:
        result = json.loads(lines[-1])
    peak[0] = max(peak[0], int(result.pop("peak_bytes", 0)))
    return {
        "status": status,
        "seconds": round(seconds, 1),
        "peak_gib": round(peak[0] / 2**30, 3),
        "log": str(log_path),
        **result,
    }


def child_main(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    result = CHILDREN[args.child](args)
    with open("/proc/self/status") as fh:
        hwm = next(line for line in fh if line.startswith("VmHWM:"))
    result["peak_bytes"] = int(hwm.split()[1]) * 1024
    print(json.dumps(result, default=str), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        return child_main(args)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    out = run / "llama_1b.json"
    record = json.loads(out.read_text()) if out.exists() else {}
    record["command"] = "python -m benchmarks.llama_1b " + " ".join(argv)
    record["settings"] = {k: v for k, v in vars(args).items() if k not in ("child", "redo")}
    record.setdefault("stages", {})
    stages = list(STAGES) + (["kronfluence"] if args.peer else [])
    for stage in stages:
        done = record["stages"].get(stage, {}).get("status") == "done"
        if done and stage not in args.redo:
            print(f"{stage}: recorded, skipped (--redo {stage} to rerun)", flush=True)
            continue
        limit = args.time_limit if stage == "kronfluence" else None
        print(f"{stage}: running (log {run / (stage + '.log')})", flush=True)
        record["stages"][stage] = run_child(stage, argv, limit, run / f"{stage}.log")
        progress = run / "kronfluence_progress.json"
        if stage == "kronfluence" and progress.exists():  # how far it got (killed or not)
            marks = json.loads(progress.read_text())
            record["stages"][stage]["reached"] = marks[-1]["stage"] if marks else None
        record["load_average"] = os.getloadavg()
        out.write_text(json.dumps(record, indent=2))
        print(f"{stage}: {json.dumps(record['stages'][stage])[:400]}", flush=True)
        if record["stages"][stage]["status"] != "done" and stage != "kronfluence":
            return 1
    pred, fit, score = (record["stages"].get(k, {}) for k in STAGES)
    if fit.get("status") == "done" and "fit_peak_gib" in pred and not fit["loaded_stored_stage"]:
        record["dry_run_error"] = {
            "fit": fit["peak_gib"] / pred["fit_peak_gib"] - 1,
            "score": score.get("peak_gib", 0) / pred["score_peak_gib"] - 1
            if score.get("status") == "done"
            else None,
        }
        out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
