"""Approximate search on a real gradient index: SmolLM2-135M-Instruct's projected gradients of
Shakespeare windows, recall@10 of FAISS IVF / IVF-PQ (re-ranked exactly) against the exhaustive
scan (issue 24, item 5; the synthetic 100k / 1M rows are :mod:`benchmarks.ann`).

The run directory ``--run`` is an ordinary influscope run, written so that the CLI reads it:

* ``train.jsonl``: ``--n-train`` windows of ``--window`` tokens (``{"text"}``, decoded from
  SmolLM2's own tokens) cut from the first 5,500 Shakespeare chunks of the benchmarks;
* ``queries.jsonl``: held-out windows from the 20 chunks never used for training, as
  ``{"prompt", "completion"}`` (first half / second half of the window);
* ``index/index``: the projected gradient index, built with the library
  (``influscope.index.build_index``) exactly as ``influscope index --model <gguf> --train
  RUN/train.jsonl --run RUN --k-in K --k-out K --curvature C --shard-size 256`` would build it
  (same encoding, layers and settings, so that command finds it complete and reuses it).
  The build is resumable (one shard of 256 windows at a time): rerun the same command.

Measured, one thread for torch and FAISS: the exhaustive scan (:meth:`GradientIndex.search`)
against ``faiss-ivf`` (``nlist`` = the library's default ``≈ 4√N``, capped at ``N/39``; an
``nprobe`` sweep) and ``faiss-ivfpq`` (PQ ``m`` sub-quantisers of 8 bits), both followed by exact
re-ranking of their top ``k'`` (:func:`influscope.index.rerank`): recall@10 against the scan's
top-10, seconds for the batch of queries and for single queries, peak RSS.

With ``--ekfac-rows S`` a projected EK-FAC is also fitted on the first ``S`` windows (a second,
small index ``index/ekfac-S`` with the same seeded projection, checked equal) and the queries
are preconditioned with it too: the stored rows ``g̃_m`` of a projected index do not depend on
its curvature, only the queries ``(F̃ + λI)^{-1} g̃_q`` do, so this measures the geometry an
EK-FAC index of the same rows would search (with curvature fitted on ``S`` windows).

``--unit`` adds unit-normalised rows and queries (what ``IndexConfig(normalize=True)`` stores and
asks: cosines); ``--mips`` the ways the IVF search handles inner products. ``--use-shards K``
measures the first ``K`` finished shards of an unfinished build as a run of their own,
``RUN-firstK`` (:func:`prefix_run`). The CLI path on such a run:
``benchmarks/ann_smollm2_cli.sh RUN-firstK``.

    .venv/bin/python -m benchmarks.ann_smollm2 --run /tmp/ann_smol/run --n-train 4096 --build-only
    .venv/bin/python -m benchmarks.ann_smollm2 --run /tmp/ann_smol/run --n-train 4096 \
        --use-shards 6 --ekfac-rows 128 --unit --report docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks.ann import _recall, _timed
from benchmarks.common import ROOT, _chunks, load_average, write_section

N_HELD_OUT = 20  # the last 20 chunks are never training windows
SHARD = 256


def _decoded_windows(tok, texts: list[str], window: int) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tok(t)["input_ids"]
        out += [ids[lo : lo + window] for lo in range(0, len(ids) - window + 1, window)]
    return out


def prepare(run: Path, tok, n_train: int, n_queries: int, window: int) -> None:
    """Write ``run/train.jsonl`` and ``run/queries.jsonl`` (once; kept for resumed builds)."""
    if (run / "train.jsonl").is_file() and (run / "queries.jsonl").is_file():
        return
    texts = _chunks()
    train = _decoded_windows(tok, texts[:-N_HELD_OUT], window)
    if len(train) < n_train:
        raise SystemExit(f"only {len(train)} training windows of {window} tokens")
    held = _decoded_windows(tok, texts[-N_HELD_OUT:], window)[:n_queries]
    run.mkdir(parents=True, exist_ok=True)
    half = window // 2
    with open(run / "train.jsonl", "w") as fh:
        for ids in train[:n_train]:
            fh.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    with open(run / "queries.jsonl", "w") as fh:
        for ids in held:
            rec = {"prompt": tok.decode(ids[:half]), "completion": tok.decode(ids[half:])}
            fh.write(json.dumps(rec) + "\n")


def prefix_run(inf, run: Path, n_shards: int, cfg) -> tuple[Path, object, float]:
    """The first ``n_shards`` finished shards of an unfinished build in ``run``, as a run of
    their own, ``<run>-first<n_shards>``: its ``train.jsonl`` is the first ``n`` windows, its
    ``index/index`` the same projection, curvature and shard files with ``meta.json``'s shard
    list, row count and data fingerprint cut to those ``n`` windows — what ``build_index``
    writes for them, since a row depends only on its own window (checked here on the first 8
    windows, rebuilt from scratch), so ``influscope index`` on that run reuses it.

    Returns:
        ``(run directory, encoded first-n training set, seconds the build took for them)``.
    """
    from influscope.index import GradientIndex, build_index
    from influscope.index.store import shard_path
    from influscope.loading import load_records

    src = run / "index" / "index"
    meta = json.loads((src / "meta.json").read_text())
    meta["shards"] = meta["shards"][:n_shards]
    n = meta["n_examples"] = meta["shards"][-1][1]
    out = run.parent / f"{run.name}-first{n_shards}"
    root = out / "index" / "index"
    shutil.rmtree(out, ignore_errors=True)
    (root / "shards").mkdir(parents=True)
    lines = (run / "train.jsonl").read_text().splitlines(keepends=True)[:n]
    (out / "train.jsonl").write_text("".join(lines))
    shutil.copy(run / "queries.jsonl", out / "queries.jsonl")
    train = inf.encode(load_records(out / "train.jsonl"))
    meta["data"] = train.fingerprint()
    for name in ("projector.safetensors", "curvature.safetensors"):
        shutil.copy(src / name, root / name)
    for k in range(n_shards):
        shutil.copy(shard_path(src, k), shard_path(root, k))
    (root / "meta.json").write_text(json.dumps(meta))
    first = build_index(inf.tracked, train.subset(range(8)), out / "check", cfg)
    a, b = first.rows(torch.arange(8)), GradientIndex(root).rows(torch.arange(8))
    print(f"first 8 rows rebuilt from scratch: max |Δ| {float((a - b).abs().max()):.2e}")
    assert torch.equal(a, b), "rows depend on more than their own window"
    shutil.rmtree(out / "check")
    spent = (
        shard_path(src, n_shards - 1).stat().st_mtime
        - (src / "projector.safetensors").stat().st_mtime
    )
    return out, train, spent


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(index, queries: torch.Tensor, args, label: str) -> tuple[list[str], dict]:
    """Exhaustive scan vs each FAISS backend (re-ranked) for one set of ``(Q, D)`` queries."""
    from influscope.index import AnnConfig, build_ann, rerank
    from influscope.index.ann import _nlist

    k, n_single = args.k, min(args.n_single, len(queries))
    exact, t_exact = _timed(index.search, queries, k)
    t_exact1 = sum(_timed(index.search, queries[i : i + 1], k)[1] for i in range(n_single))
    t_exact1 /= n_single
    rows = []
    pairs = [(b, m) for b in args.backends for m in args.mips if m == "augment" or "pq" not in b]
    for backend, mips in pairs:  # IVF-PQ with the default augment only
        cfg = AnnConfig(backend=backend, mips=mips, m=args.m, nbits=args.nbits,
                        train_rows=args.train_rows)  # fmt: skip
        ann, t_build = _timed(build_ann, index, cfg, f"{backend}-bench", True)
        nlist = _nlist(index.n_rows, cfg)
        for nprobe in [p for p in args.nprobe if p <= nlist] + [nlist]:

            def query(q, ann=ann, nprobe=nprobe):
                cand = ann.search(q, k=args.rerank_k, nprobe=nprobe)
                return rerank(index, q, cand.indices, k=k)

            top, t_batch = _timed(query, queries)
            t1 = sum(_timed(query, queries[i : i + 1])[1] for i in range(n_single)) / n_single
            raw = ann.search(queries, k=k, nprobe=nprobe)
            row = dict(backend=backend, mips=mips, nlist=nlist, nprobe=nprobe, build_s=t_build,
                       recall_raw=_recall(raw.indices, exact.indices),
                       recall=_recall(top.indices, exact.indices), t_batch=t_batch, t_single=t1)  # fmt: skip
            rows.append(row)
            print(label, row, flush=True)
    norms = index.rows(torch.arange(index.n_rows)).norm(dim=1)  # (N,)
    big = norms >= norms.quantile(0.95)  # the 5 % largest rows
    stats = {
        "t_exact": t_exact,
        "t_exact1": t_exact1,
        "norm_p50": float(norms.median()),
        "norm_max_over_p50": float(norms.max() / norms.median()),
        "norm_p99_over_p50": float(norms.quantile(0.99) / norms.median()),
        "top10_in_top5pct_norm": float(big[exact.indices.clamp(min=0)].float().mean()),
    }
    lines = [
        f"| {label} | exhaustive scan | – | 1 | 1 | {t_exact:.3f} | {t_exact1:.4f} |",
    ]
    for r in rows:
        lines.append(
            f"| {label} | `{r['backend']}` {r['mips']} | {r['nprobe']} / {r['nlist']} | {r['recall_raw']:.3f} "
            f"| {r['recall']:.3f} | {r['t_batch']:.3f} ({t_exact / r['t_batch']:.1f}×) | "
            f"{r['t_single']:.4f} ({t_exact1 / r['t_single']:.1f}×) |"
        )
    return lines, {**stats, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="Run directory (kept; the build resumes).")
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--n-queries", type=int, default=100)
    parser.add_argument("--window", type=int, default=32, help="Tokens per window.")
    parser.add_argument("--k-lora", type=int, default=8, help="LoGra k_in = k_out per layer.")
    parser.add_argument("--curvature", default="identity", choices=["identity", "ekfac"])
    parser.add_argument("--ekfac-rows", type=int, default=0, help="Also EK-FAC queries (0: no).")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument(
        "--use-shards", type=int, default=0,
        help="Measure on the first N finished shards of an unfinished build (0: build all).",
    )  # fmt: skip
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerank-k", type=int, default=100, help="k' candidates re-ranked.")
    parser.add_argument("--n-single", type=int, default=10)
    parser.add_argument("--backends", nargs="+", default=["faiss-ivf", "faiss-ivfpq"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--mips", nargs="+", default=["augment", "direct"])
    parser.add_argument(
        "--unit", action="store_true", help="Also unit rows and queries (normalize=True)."
    )
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--nbits", type=int, default=8)
    parser.add_argument("--train-rows", type=int, default=65_536)
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    args = parser.parse_args()
    os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")
    import faiss

    from influscope import Influence
    from influscope.assets import smollm2_gguf
    from influscope.index import (
        GradientIndex,
        IndexConfig,
        build_index,
        preconditioned_queries,
    )
    from influscope.loading import load_model, load_records
    from influscope.tasks import CausalLMTask

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    run = Path(args.run)
    t0 = time.perf_counter()
    model, tok = load_model(str(smollm2_gguf()), "causal_lm")
    prepare(run, tok, args.n_train, args.n_queries, args.window)
    # as `influscope index/query --model <gguf> --train RUN/train.jsonl --run RUN` encode them
    inf = Influence(model, CausalLMTask(chat_loss="assistant"), modules="mlp", run_dir=run,
                    tokenizer=tok)  # fmt: skip
    train = inf.encode(load_records(run / "train.jsonl"))
    queries = inf.encode(load_records(run / "queries.jsonl"))
    print(f"model + data: {time.perf_counter() - t0:.0f} s; {len(train)} train, {len(queries)} "
          f"queries; {len(inf.layers)} layers; load {load_average()}", flush=True)  # fmt: skip
    cfg = IndexConfig(k_in=args.k_lora, k_out=args.k_lora, curvature=args.curvature,
                      shard_size=SHARD, batch_size=8)  # fmt: skip
    root = run / "index" / "index"
    timing = run / "build_seconds.json"
    if args.use_shards:  # the finished shards of an unfinished build, as a run of their own
        run, train, spent = prefix_run(inf, run, args.use_shards, cfg)
        root = run / "index" / "index"
        index = GradientIndex(root)
        build = {"seconds": spent, "load_average": "(see the text)"}
    else:
        done_before = timing.is_file()
        t0 = time.perf_counter()
        index = build_index(inf.tracked, train, root, cfg)
        if not done_before:  # seconds of the invocation that finished the build (resumed or not)
            timing.write_text(json.dumps({"seconds": time.perf_counter() - t0,
                                          "load_average": load_average()}))  # fmt: skip
        build = json.loads(timing.read_text())
    print(f"index: {index.n_rows} rows × {index.meta['dim']}; {build}", flush=True)
    if args.build_only:
        return
    sets = {f"{args.curvature}": preconditioned_queries(inf.tracked, queries, index)}  # (Q, D)
    ek_seconds = None
    if args.ekfac_rows and args.curvature != "ekfac":
        sub_root = Path(args.run) / "index" / f"ekfac-{args.ekfac_rows}"  # the full run's
        sub_cfg = IndexConfig(k_in=args.k_lora, k_out=args.k_lora, curvature="ekfac",
                              shard_size=SHARD, batch_size=8)  # fmt: skip
        t0 = time.perf_counter()
        sub = build_index(inf.tracked, train.subset(range(args.ekfac_rows)), sub_root, sub_cfg)
        if not (sub_root / "build_seconds.json").is_file():  # the invocation that built it
            (sub_root / "build_seconds.json").write_text(json.dumps(time.perf_counter() - t0))
        ek_seconds = json.loads((sub_root / "build_seconds.json").read_text())
        a = (root / "projector.safetensors").read_bytes()
        assert a == (sub_root / "projector.safetensors").read_bytes(), "projections differ"
        sets[f"ekfac ({args.ekfac_rows} rows)"] = preconditioned_queries(inf.tracked, queries, sub)
    table, stats = [], {}
    for label, q in sets.items():
        lines, st = measure(index, q, args, label)
        table += lines
        stats[label] = st
    if args.unit:  # what IndexConfig(normalize=True) stores and asks: cosines
        from influscope.index import write_rows_index
        from influscope.index.trackstar import unit_rows

        unit = write_rows_index(run / "index" / "unit-bench",
                                [unit_rows(index.rows(torch.arange(index.n_rows)))], "float16")  # fmt: skip
        for label, q in list(sets.items()):
            lines, st = measure(unit, unit_rows(q), args, f"{label}, unit rows")
            table += lines
            stats[f"{label}, unit rows"] = st
        shutil.rmtree(unit.root)
    for path in (root / "ann").glob("*-bench.*"):  # this benchmark's FAISS files only
        path.unlink()
    peak = _peak_mib()
    shard_mib = sum(p.stat().st_size for p in (root / "shards").glob("*.npy")) / 2**20
    norm = next(iter(stats.values()))
    text = "\n".join(
        [
            "### ANN over a real SmolLM2-135M gradient index",
            "",
            f"Command: `.venv/bin/python -m benchmarks.ann_smollm2 {' '.join(sys.argv[1:])}`",
            "",
            f"SmolLM2-135M-Instruct (GGUF, float32), {len(inf.layers)} MLP layers, LoGra "
            f"{args.k_lora} × {args.k_lora} per layer (D = {index.meta['dim']:,}), "
            f"{index.n_rows:,} Shakespeare windows of {args.window} tokens, float16 index "
            f"({shard_mib:.0f} MiB); index curvature {args.curvature}; "
            + (
                f"the first {args.use_shards} shards (written in {build['seconds']:.0f} s, one "
                f"thread) of an unfinished build of {args.n_train:,}, as run `{run}`"
                if args.use_shards
                else f"built in {build['seconds']:.0f} s (one thread, load average "
                f"{build['load_average']})"
            )
            + (f"; EK-FAC on {args.ekfac_rows} windows: {ek_seconds:.0f} s" if ek_seconds else "")
            + f". {len(queries)} held-out windows as queries (prompt = first half, measured on "
            f"the second), k = {args.k}, re-ranked k' = {args.rerank_k}; one thread for torch "
            f"and FAISS; nlist = FAISS default of the library (≈ 4√N, capped at N/39); PQ m = "
            f"{args.m} × {args.nbits} bits; peak RSS {peak:.0f} MiB; load average at the end "
            f"{load_average()}. Row norms: max / median {norm['norm_max_over_p50']:.1f}, "
            f"99th percentile / median {norm['norm_p99_over_p50']:.2f}; "
            + ", ".join(
                f"{v['top10_in_top5pct_norm']:.0%} of the exact top-10 ({k})"
                for k, v in stats.items()
            )
            + " are among the 5 % largest rows.",
            "",
            "| queries | backend, mips | nprobe / nlist | recall@10 (ANN) | recall@10 (re-ranked) "
            "| batch s (× faster) | single-query s (× faster) |",
            "|---|---|---|---|---|---|---|",
            *table,
        ]
    )
    print(text)
    (run / "ann_results.json").write_text(json.dumps(stats, indent=1))
    if args.report:
        write_section(ROOT / args.report, "ann_smollm2", text)


if __name__ == "__main__":
    main()
