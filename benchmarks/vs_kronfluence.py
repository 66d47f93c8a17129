"""EK-FAC influence, influscope vs Kronfluence 1.0.1, under matched settings.

Setting (issue 4): a tiny GPT-2 (``small``: 2 layers, width 128; ``large``: 4 layers, width 256;
128-token sequences, 4,096-token BPE vocabulary) trained on Shakespeare; 500 training sequences
× 20 queries; EK-FAC on the MLP ``c_fc``/``c_proj`` layers of every block; empirical Fisher (data
labels: the only way both libraries see the very same gradients, since their label samplers
differ); damping ``0.1 × mean(Λ_ℓ)`` per layer (Kronfluence's heuristic, influscope's default);
full-rank query gradients; float32 model, batch size 16; measurement = log p(sequence) for
influscope and the summed cross-entropy for Kronfluence, which makes the two sign conventions
agree (``I = -∇f^⊤(G+λI)^{-1}∇L`` vs Kronfluence's ``∇loss_q^⊤(G+λI)^{-1}∇L``).

Every library runs in its own fresh subprocess (so peak RSS is its own) with 2 torch threads;
the *floor* is one plain forward + backward (``loss.backward()``, all parameter gradients) over
the 500 training sequences.

    .venv/bin/python -m benchmarks.vs_kronfluence [--variants small large] [--report docs/benchmarks.md]

Last line: ``total_ratio_vs_kronfluence=<x> spearman_vs_kronfluence=<y> passes_over_floor=<z>``
for the first variant (the issue's target setting): x = influscope's total seconds /
Kronfluence's, y = mean over queries of the Spearman correlation of the two libraries' scores,
z = influscope's total seconds / floor seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import (
    ROOT,
    Stages,
    load_average,
    load_model,
    mlp_names,
    prepare,
    spearman,
    write_section,
)

BATCH = 16


def _batches(ids: torch.Tensor):
    for start in range(0, len(ids), BATCH):
        yield ids[start : start + BATCH]


def run_floor(data, stages: Stages) -> dict:
    model = load_model(data)
    with stages.stage("forward+backward"):
        for x in _batches(data.train):
            out = model(input_ids=x, labels=x)
            model.zero_grad(set_to_none=True)
            (out.loss * x.numel()).backward()
    return {}


def run_influscope(data, stages: Stages) -> dict:
    from influscope import EncodedDataset, FitConfig, Influence, ScoreConfig

    model = load_model(data)

    def dataset(ids: torch.Tensor) -> EncodedDataset:
        ones = torch.ones(ids.shape[1], dtype=torch.long)
        return EncodedDataset([{"input_ids": r, "attention_mask": ones, "labels": r} for r in ids])

    train, queries = dataset(data.train), dataset(data.queries)
    inf = Influence(model, "causal_lm", modules=mlp_names(model), device="cpu")
    budget = getattr(data, "memory_gb", None)  # "default", "nocache" or GiB
    memory_gb = None if budget in (None, "default", "nocache") else float(budget)
    fit = FitConfig(
        curvature="ekfac",
        fisher="empirical",
        batch_size=BATCH,
        memory_gb=memory_gb,
        cache_mb=0 if budget == "nocache" else None,
    )
    score = ScoreConfig(query_rank=None, batch_size=BATCH, memory_gb=memory_gb)
    with stages.stage("factors"):
        op = inf.fit(train, fit)
    plan = inf.last_fit_plan
    with stages.stage("scores"):
        scores = inf.score(queries, train, op, score).pairwise  # (Q, N)
    return {
        "scores": scores.tolist(),
        "budget_gib": plan.budget / 2**30,
        "replayed_shards": inf.last_fit_shards["replayed"],
        "shards": inf.last_fit_shards["computed"] or -(-len(train) // 256),
    }


def run_kronfluence(data, stages: Stages) -> dict:
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.disable(logging.WARNING)
    model = load_model(data)
    names = mlp_names(model)

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()  # (B, T-1, V)
            labels = batch["input_ids"][:, 1:]
            if sample:  # not used: empirical Fisher (see the module docstring)
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), -1).flatten(0, 1)
                    labels = torch.multinomial(probs, 1).view(labels.shape)
            return torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), reduction="sum"
            )

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

    class Rows(torch.utils.data.Dataset):
        def __init__(self, ids):
            self.ids = ids

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i]}

    task = LMTask()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=out)
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        train, queries = Rows(data.train), Rows(data.queries)
        kw = {"factors_name": "ekfac", "dataset": train, "per_device_batch_size": BATCH}
        kw |= {"factor_args": factor_args, "overwrite_output_dir": True}
        with stages.stage("factors"):
            analyzer.fit_all_factors(**kw)
        with stages.stage("scores"):
            analyzer.compute_pairwise_scores(
                scores_name="s",
                factors_name="ekfac",
                query_dataset=queries,
                train_dataset=train,
                per_device_query_batch_size=BATCH,
                per_device_train_batch_size=BATCH,
                score_args=ScoreArguments(damping_factor=None),
                overwrite_output_dir=True,
            )
        scores = analyzer.load_pairwise_scores("s")["all_modules"]  # (Q, N)
    return {"scores": scores.tolist()}


def run_bergson(data, stages: Stages) -> dict:
    """Bergson 2.5.1's EK-FAC pipeline (``bergson ekfac``) in its own venv (``make peers-bergson``).

    Matched settings: K-FAC with the eigenvalue correction (= EK-FAC) over the same MLP
    modules, dataset labels (empirical Fisher), damping ``0.1 × mean(Λ)`` (its
    ``damped_inverse`` default), per-query scores (``aggregation none``), float32. Its
    pipeline builds query gradients, fits, applies the inverse and scores; the fit
    (``approximate_hessians``) is timed as ``factors`` and the rest as ``scores``.
    """
    import numpy as np
    from bergson.__main__ import main as bergson_main
    from bergson.hessians import pipeline

    fit = pipeline.approximate_hessians

    def timed_fit(*args, **kwargs):
        with stages.stage("factors"):
            return fit(*args, **kwargs)

    pipeline.approximate_hessians = timed_fit
    modules = [n.removeprefix("transformer.") for n in mlp_names(load_model(data))]
    with tempfile.TemporaryDirectory() as out:
        for name, ids in (("train", data.train), ("queries", data.queries)):
            with open(f"{out}/{name}.jsonl", "w") as f:
                for row in ids.tolist():
                    f.write(json.dumps({"input_ids": row, "labels": row}) + "\n")
        argv = ["bergson", "ekfac", f"{out}/run", "--model", str(data.model_dir)]
        argv += ["--data.dataset", f"{out}/train.jsonl", "--query.dataset", f"{out}/queries.jsonl"]
        argv += ["--method", "kfac", "--hessian_cfg.ev_correction", "true"]
        argv += ["--use_dataset_labels", "true", "--score", "individual"]
        argv += ["--query.aggregation", "none", "--nproc_per_node", "1"]
        argv += ["--token_batch_size", str(data.train.shape[1]), "--index_cfg.modules", *modules]
        saved, sys.argv = sys.argv, argv
        try:
            with stages.stage("total"):
                bergson_main()
        finally:
            sys.argv = saved
        info = json.loads(Path(f"{out}/run/scores/info.json").read_text())
        dtype = np.dtype({k: info["dtype"][k] for k in ("names", "formats", "offsets", "itemsize")})
        rows = np.memmap(
            f"{out}/run/scores/scores.bin", dtype=dtype, mode="r", shape=(info["num_rows"],)
        )
        scores = [rows[f"score_{q}"].astype(float).tolist() for q in range(info["num_scores"])]
    for d in (stages.seconds, stages.cpu):
        d["scores"] = d.pop("total") - d["factors"]
    stages.peak_mib["scores"] = stages.peak_mib.pop("total")
    return {"scores": scores}  # (Q, N), Kronfluence's sign: ∇loss_qᵀ(G+λI)⁻¹∇L


WORKERS = {
    "floor": run_floor,
    "influscope": run_influscope,
    "kronfluence": run_kronfluence,
    "bergson": run_bergson,
}
BERGSON_PYTHON = ROOT / ".venv-bergson" / "bin" / "python"


def worker(args) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    data = prepare(args.variant, args.n_train, args.n_queries)
    data.memory_gb = args.memory_gb
    stages = Stages()
    extra = WORKERS[args.worker](data, stages)
    print(json.dumps({**stages.result(), **extra}))


def spawn(name: str, args, memory_gb: str = "default") -> dict:
    python = str(BERGSON_PYTHON) if name == "bergson" else sys.executable
    cmd = [python, "-m", "benchmarks.vs_kronfluence", "--worker", name]
    cmd += ["--variant", args.variant, "--memory-gb", memory_gb]
    cmd += ["--n-train", str(args.n_train), "--n-queries", str(args.n_queries)]
    env = None
    if name == "bergson":  # its own venv; influscope and the benchmarks from this checkout
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_variant(args) -> tuple[list[str], tuple[float, float, float]]:
    prepare(args.variant, args.n_train, args.n_queries)  # train once, outside the timings
    names = ["floor", "influscope", "kronfluence"] + (["bergson"] if args.bergson else [])
    res = {name: spawn(name, args) for name in names}
    floor = res["floor"]["seconds"]["forward+backward"]
    ours, theirs = res["influscope"], res["kronfluence"]
    a, b = torch.tensor(ours["scores"]), torch.tensor(theirs["scores"])
    rho = sum(spearman(a[q], b[q]) for q in range(len(a))) / len(a)
    rows = [f"### `{args.variant}` ({args.n_train} train × {args.n_queries} queries)", ""]
    rows += ["| stage | influscope s | Kronfluence s | ratio | CPU-s ratio | influscope peak "
             "RSS MiB | Kronfluence peak RSS MiB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for stage in ("factors", "scores"):
        s1, s2 = ours["seconds"][stage], theirs["seconds"][stage]
        c1, c2 = ours["cpu_seconds"][stage], theirs["cpu_seconds"][stage]
        rows.append(
            f"| {stage} | {s1:.2f} | {s2:.2f} | {s1 / s2:.2f} | {c1 / c2:.2f} | "
            f"{ours['peak_mib'][stage]:.0f} | {theirs['peak_mib'][stage]:.0f} |"
        )
    t1, t2 = sum(ours["seconds"].values()), sum(theirs["seconds"].values())
    c1, c2 = sum(ours["cpu_seconds"].values()), sum(theirs["cpu_seconds"].values())
    cf = res["floor"]["cpu_seconds"]["forward+backward"]
    rows.append(
        f"| **total** | **{t1:.2f}** | **{t2:.2f}** | **{t1 / t2:.2f}** | **{c1 / c2:.2f}** | "
        f"{ours['max_rss_mib']:.0f} | {theirs['max_rss_mib']:.0f} |"
    )
    rows += [
        "",
        f"- floor (one forward+backward over the {args.n_train} training sequences): "
        f"{floor:.2f} s → influscope = {t1 / floor:.2f} passes, Kronfluence = "
        f"{t2 / floor:.2f} passes (in CPU seconds: {c1 / cf:.2f} and {c2 / cf:.2f})",
        f"- Spearman(influscope, Kronfluence), mean over queries: {rho:.4f}; flattened: "
        f"{spearman(a.flatten(), b.flatten()):.4f}",
        f"- load average after the run (2-core machine, shared): {load_average()}",
        "",
    ]
    if args.bergson:
        rows[-1:-1] = _bergson_rows(ours, res["bergson"], a, t1)
    if args.budgets:
        rows[-1:-1] = _budget_rows(args, ours, theirs)
    return rows, (t1 / t2, rho, t1 / floor)


def _budget_rows(args, ours: dict, theirs: dict) -> list[str]:
    """influscope again under each of ``--budgets`` (GiB, or ``nocache``): time and peak RSS
    against Kronfluence's from the same run (issue 22's targets: ≤ 0.5× its time, ≤ 1.0× its
    peak)."""
    t2, m2 = sum(theirs["seconds"].values()), theirs["max_rss_mib"]
    c2 = sum(theirs["cpu_seconds"].values())
    rows = ["", f"Memory budget (`--memory-gb`) vs time and peak RSS (Kronfluence: {t2:.2f} s, "
            f"{c2:.2f} CPU-s, {m2:.0f} MiB):", "",
            "| budget | replayed shards | factors s | scores s | total s | time ÷ Kronfluence | "
            "CPU-s ÷ Kronfluence | peak RSS MiB | peak ÷ Kronfluence | under the budget |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    runs = [("default", ours)] + [(b, spawn("influscope", args, b)) for b in args.budgets]
    for budget, res in runs:
        t1, m1 = sum(res["seconds"].values()), res["max_rss_mib"]
        label = {"default": f"default ({res['budget_gib']:.1f} GiB)", "nocache": "no cache"}
        under = "–" if budget in ("default", "nocache") else str(m1 <= 1024 * float(budget))
        rows.append(
            f"| {label.get(budget, budget + ' GiB')} | {res['replayed_shards']}/"
            f"{res['shards']} | {res['seconds']['factors']:.2f} | {res['seconds']['scores']:.2f}"
            f" | {t1:.2f} | {t1 / t2:.2f} | {sum(res['cpu_seconds'].values()) / c2:.2f} | "
            f"{m1:.0f} | {m1 / m2:.2f} | {under} |"
        )
    return rows


def _bergson_rows(ours: dict, peer: dict, a: torch.Tensor, t1: float) -> list[str]:
    """The second peer's columns: Bergson's stage times and peaks beside influscope's."""
    b = torch.tensor(peer["scores"])
    rho = sum(spearman(a[q], b[q]) for q in range(len(a))) / len(a)
    rows = ["", "| stage | influscope s | Bergson 2.5.1 s | ratio | influscope peak RSS MiB | "
            "Bergson peak RSS MiB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for stage in ("factors", "scores"):
        s1, s2 = ours["seconds"][stage], peer["seconds"][stage]
        rows.append(
            f"| {stage} | {s1:.2f} | {s2:.2f} | {s1 / s2:.2f} | {ours['peak_mib'][stage]:.0f} | "
            f"{peer['peak_mib'][stage]:.0f} |"
        )
    t2 = sum(peer["seconds"].values())
    rows.append(
        f"| **total** | **{t1:.2f}** | **{t2:.2f}** | **{t1 / t2:.2f}** | "
        f"{ours['max_rss_mib']:.0f} | {peer['max_rss_mib']:.0f} |"
    )
    rows += ["", f"- Spearman(influscope, Bergson), mean over queries: {rho:.4f}"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["small", "large"])
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-queries", type=int, default=20)
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    parser.add_argument(
        "--bergson",
        action=argparse.BooleanOptionalAction,
        default=BERGSON_PYTHON.is_file(),
        help="Add Bergson 2.5.1 as a second peer (default: when `make peers-bergson` has run).",
    )
    parser.add_argument(
        "--budgets",
        nargs="*",
        default=[],
        help="Also run influscope under these memory budgets (GiB, or 'nocache') and add a "
        "budget vs time vs peak table.",
    )
    parser.add_argument("--memory-gb", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="small", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    lines, first = [], None
    for variant in args.variants:
        args.variant = variant
        rows, summary = bench_variant(args)
        print("\n".join(rows), flush=True)
        lines += rows
        first = first or summary
    command = "`.venv/bin/python -m benchmarks.vs_kronfluence " + " ".join(sys.argv[1:]) + "`"
    if args.report:
        head = ["## EK-FAC vs Kronfluence 1.0.1", "", f"Command: {command}", ""]
        write_section(ROOT / args.report, "vs_kronfluence", "\n".join(head + lines))
    x, y, z = first
    print(
        f"total_ratio_vs_kronfluence={x:.3f} spearman_vs_kronfluence={y:.4f} passes_over_floor={z:.2f}"
    )


if __name__ == "__main__":
    main()
