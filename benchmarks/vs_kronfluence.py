"""EK-FAC influence, influscope vs Kronfluence 1.0.1, under matched settings.

Setting (issue 4): a tiny GPT-2 (``small``: 2 layers, width 128; ``large``: 4 layers, width 256;
128-token sequences, 4,096-token BPE vocabulary) trained on Shakespeare; 500 training sequences
× 20 queries; EK-FAC on the MLP ``c_fc``/``c_proj`` layers of every block; empirical Fisher (data
labels: the only way both libraries see the very same gradients, since their label samplers
differ); damping ``0.1 × mean(Λ_ℓ)`` per layer (Kronfluence's heuristic, influscope's default);
full-rank query gradients; float32 model, batch size 16; measurement = log p(sequence) for
influscope and the summed cross-entropy for Kronfluence, which makes the two sign conventions
agree (``I = -∇f^⊤(G+λI)^{-1}∇L`` vs Kronfluence's ``∇loss_q^⊤(G+λI)^{-1}∇L``).

Every library runs in its own fresh subprocess (so peak RSS is its own) with ``--threads``
(default 2) torch threads;
the *floor* is one plain forward + backward (``loss.backward()``, all parameter gradients) over
the 500 training sequences.

    .venv/bin/python -m benchmarks.vs_kronfluence [--variants small large] [--report docs/benchmarks.md]

Last line: ``total_ratio_vs_kronfluence=<x> spearman_vs_kronfluence=<y> passes_over_floor=<z>``
for the first variant (the issue's target setting): x = influscope's total seconds /
Kronfluence's, y = mean over queries of the Spearman correlation of the two libraries' scores,
z = influscope's total seconds / floor seconds.

Variant ``smollm2`` (issue 22, item 1): SmolLM2-135M-Instruct from the project's GGUF asset,
de-quantised to float32 (saved once as a Hugging Face directory under
``.cache/bench/smollm2/model`` so that Bergson can load it too); EK-FAC over all 90 MLP
projections (``gate_proj``/``up_proj``/``down_proj`` of the 30 blocks); ``--smollm2-sequences``
(120) Shakespeare windows × ``--smollm2-tokens`` (96) tokens, ``--smollm2-queries`` (8)
held-out windows of the same length; **true Fisher** (each library samples its own labels from
the model, one draw per token); the same ``0.1 × mean(Λ_ℓ)`` damping; queries scored at full
rank and at rank 32 (Kronfluence: ``query_gradient_low_rank=32`` with ``use_full_svd=True``,
the exact SVD influscope uses). The factors stage is split into covariance /
eigendecomposition / eigenvalues as each library exposes them. Its table goes to its own
section (``vs_kronfluence_smollm2``) of the ``--report`` file::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.vs_kronfluence --variants smollm2 \
        --report docs/benchmarks.md

Peak RSS is each worker's ``VmHWM`` (not ``ru_maxrss``, which Linux carries over from the
parent across ``execve``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.common import (
    CACHE,
    ROOT,
    SEQ,
    BenchData,
    Stages,
    _chunks,
    load_average,
    load_model,
    mlp_names,
    prepare,
    spearman,
    write_section,
)

BATCH = 16
SMOLLM2 = "smollm2"
LLAMA_MLP = r"\.mlp\.(gate|up|down)_proj$"
RANKS = {SMOLLM2: [None, 32]}  # query ranks scored per variant (default: full rank only)
SCORE_STAGE = {None: "scores", 32: "scores_r32"}
LABEL = {
    "factors": "factors",
    "covariance": "· covariance",
    "eigendecomposition": "· eigendecomposition",
    "eigenvalues": "· eigenvalues",
    "scores": "scores (full rank)",
    "scores_r32": "scores (rank 32)",
    "queries": "· query gradients",
    "apply": "· apply the inverse",
    "dot": "· score the training set",
}
FACTOR_DETAIL = ("covariance", "eigendecomposition", "eigenvalues")
BERGSON_EXCLUDE = "*attn*,*lm_head*"  # every linear layer but the MLP's (GPT-2 and Llama)


class Tally:
    """Accumulated wall seconds of named sub-stages (a stage may run several times)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, owner, attr: str, name) -> None:
        """Time every call of ``owner.attr`` under ``name`` (or ``name(args, kwargs)``)."""
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            label = name(args, kwargs) if callable(name) else name
            if label is None:
                return fn(*args, **kwargs)
            with self(label):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct de-quantised to float32, as a Hugging Face directory (made once
    from the GGUF asset; Bergson loads models by directory)."""
    d = CACHE / SMOLLM2 / "model"
    if not (d / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        from influscope.assets import smollm2_gguf
        from influscope.loading import load_model as load_gguf

        model, tok = load_gguf(smollm2_gguf())  # float32
        config = model.config  # transformers refuses to save a GGUF-loaded model as is:
        if hasattr(config, "quantization_config"):  # the same weights in a plain model
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        part = d.with_name(d.name + ".part")  # renamed when complete
        plain.save_pretrained(part)
        tok.save_pretrained(part)
        part.rename(d)
    return d


def prepare_smollm2(n_train: int, tokens: int, n_queries: int) -> BenchData:
    """SmolLM2 and Shakespeare windows of exactly ``tokens`` tokens: the first ``n_train``
    chunks train, the last ``n_queries`` chunks are the queries (as for ``small``/``large``)."""
    from transformers import AutoTokenizer

    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d)
    texts = _chunks()
    if n_train + n_queries > len(texts):
        raise ValueError(f"at most {len(texts) - n_queries} training sequences")

    def encode(texts: list[str]) -> torch.Tensor:
        ids = [tok(t)["input_ids"][:tokens] for t in texts]
        short = [i for i, x in enumerate(ids) if len(x) < tokens]
        if short:
            raise ValueError(f"{len(short)} chunks have fewer than {tokens} tokens")
        return torch.tensor(ids)  # (N, tokens)

    train_texts, query_texts = texts[:n_train], texts[len(texts) - n_queries :]
    return BenchData(d, encode(train_texts), encode(query_texts), train_texts, query_texts)


def prepare_data(variant: str, n_train: int, n_queries: int, tokens: int) -> BenchData:
    """The variant's data, with its matched settings as attributes (``variant``, ``fisher``,
    ``ranks``)."""
    if variant == SMOLLM2:
        data = prepare_smollm2(n_train, tokens, n_queries)
    else:
        data = prepare(variant, n_train, n_queries)
    data.variant = variant
    data.fisher = "true" if variant == SMOLLM2 else "empirical"
    data.ranks = RANKS.get(variant, [None])
    return data


def load(data: BenchData) -> torch.nn.Module:
    """The variant's model, float32, eval mode (GPT-2: ``Conv1D`` converted to ``nn.Linear``)."""
    if getattr(data, "variant", None) != SMOLLM2:
        return load_model(data)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(data.model_dir, dtype=torch.float32).eval()


def tracked(model: torch.nn.Module) -> list[str]:
    """The tracked layers: GPT-2's MLP ``c_fc``/``c_proj``, or every Llama MLP projection."""
    names = mlp_names(model)
    return names or [n for n, _ in model.named_modules() if re.search(LLAMA_MLP, n)]


def _batches(ids: torch.Tensor):
    for start in range(0, len(ids), BATCH):
        yield ids[start : start + BATCH]


def run_floor(data, stages: Stages) -> dict:
    model = load(data)
    with stages.stage("forward+backward"):
        for x in _batches(data.train):
            out = model(input_ids=x, labels=x)
            model.zero_grad(set_to_none=True)
            (out.loss * x.numel()).backward()
    return {}


def encoded(ids: torch.Tensor):
    """``(N, T)`` token ids as an :class:`~influscope.EncodedDataset`, every token labelled."""
    from influscope import EncodedDataset

    ones = torch.ones(ids.shape[1], dtype=torch.long)
    return EncodedDataset([{"input_ids": r, "attention_mask": ones, "labels": r} for r in ids])


def run_influscope(data, stages: Stages) -> dict:
    from influscope import FitConfig, Influence, ScoreConfig
    from influscope.curvature import ekfac, kfac

    model = load(data)
    train, queries = encoded(data.train), encoded(data.queries)
    inf = Influence(model, "causal_lm", modules=tracked(model), device="cpu")
    budget = getattr(data, "memory_gb", None)  # "default", "nocache" or GiB
    memory_gb = None if budget in (None, "default", "nocache") else float(budget)
    fit = FitConfig(
        curvature="ekfac",
        fisher=data.fisher,
        batch_size=BATCH,
        memory_gb=memory_gb,
        cache_mb=0 if budget == "nocache" else None,
    )
    tally = Tally()  # the fit's own stages (benchmark-side wrappers, nothing else changes)
    tally.wrap(kfac, "covariances", "covariance")
    tally.wrap(kfac, "eigendecompose", "eigendecomposition")
    tally.wrap(ekfac, "eigenvalue_statistics", "eigenvalues")
    with stages.stage("factors"):
        op = inf.fit(train, fit)
    plan = inf.last_fit_plan
    out = {}
    for rank in data.ranks:
        score = ScoreConfig(query_rank=rank, batch_size=BATCH, memory_gb=memory_gb)
        with stages.stage(SCORE_STAGE[rank]):
            out[SCORE_STAGE[rank]] = inf.score(
                queries, train, op, score
            ).pairwise.tolist()  # (Q, N)
    return {
        **out,
        "detail": tally.seconds,
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
    model = load(data)
    names = tracked(model)

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()  # (B, T-1, V)
            labels = batch["input_ids"][:, 1:]
            if sample:  # true Fisher: labels drawn from the model (``smollm2``)
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
    tally, out = Tally(), {}
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        factor_args = FactorArguments(
            strategy="ekfac", use_empirical_fisher=data.fisher == "empirical"
        )
        train, queries = Rows(data.train), Rows(data.queries)
        kw = {"factors_name": "ekfac", "factor_args": factor_args, "overwrite_output_dir": True}
        fit_kw = kw | {"dataset": train, "per_device_batch_size": BATCH}
        with stages.stage("factors"):  # = fit_all_factors, one step at a time
            with tally("covariance"):
                analyzer.fit_covariance_matrices(**fit_kw)
            with tally("eigendecomposition"):
                analyzer.perform_eigendecomposition(**kw)
            with tally("eigenvalues"):
                analyzer.fit_lambda_matrices(**fit_kw)
        for rank in data.ranks:
            key = SCORE_STAGE[rank]
            args = ScoreArguments(
                damping_factor=None, query_gradient_low_rank=rank, use_full_svd=True
            )
            with stages.stage(key):
                analyzer.compute_pairwise_scores(
                    scores_name=key,
                    factors_name="ekfac",
                    query_dataset=queries,
                    train_dataset=train,
                    per_device_query_batch_size=BATCH,
                    per_device_train_batch_size=BATCH,
                    score_args=args,
                    overwrite_output_dir=True,
                )
            out[key] = analyzer.load_pairwise_scores(key)["all_modules"].tolist()  # (Q, N)
    return {**out, "detail": tally.seconds}


def run_bergson(data, stages: Stages) -> dict:
    """Bergson 2.5.1's EK-FAC pipeline (``bergson ekfac``) in its own venv (``make peers-bergson``).

    Matched settings: K-FAC with the eigenvalue correction (= EK-FAC) over the same MLP
    modules, dataset labels (empirical Fisher; ``small``/``large``) or labels sampled from the
    model (true Fisher, its default; ``smollm2``), damping ``0.1 × mean(Λ)`` (its
    ``damped_inverse`` default), per-query scores (``aggregation none``), float32 model. Its
    pipeline builds query gradients, fits, applies the inverse and scores; the fit
    (``approximate_hessians``) is timed as ``factors`` and the rest as ``scores``. Not
    matched (its defaults, no option to match or not used): covariances accumulated in
    float32 (``hessian_dtype``), no bias terms, no low-rank queries (full rank only).
    """
    import numpy as np
    from bergson.__main__ import main as bergson_main
    from bergson.hessians import hessian_approximations as approx
    from bergson.hessians import pipeline

    tally = Tally()
    fit = pipeline.approximate_hessians

    def timed_fit(*args, **kwargs):
        with stages.stage("factors"):
            return fit(*args, **kwargs)

    pipeline.approximate_hessians = timed_fit
    tally.wrap(pipeline, "build_query", "queries")
    tally.wrap(pipeline, "score_dataset", "dot")
    tally.wrap(
        pipeline,
        "launch_distributed_run",
        lambda a, k: "apply" if a[0] == "apply_hessian" else None,
    )
    tally.wrap(
        approx,
        "collect_hessians",
        lambda a, k: "eigenvalues" if k.get("ev_correction") else "covariance",
    )
    tally.wrap(approx, "eigendecompose_owned", "eigendecomposition")
    tally.wrap(approx, "compute_eigendecomposition", "eigendecomposition")
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # names only: no weights held beside Bergson's own copy
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(data.model_dir))
    base = model.base_model_prefix + "."  # Bergson names modules inside the base model
    modules = [n.removeprefix(base) for n in tracked(model)]
    tokens = data.train.shape[1]
    # tokens per forward pass: one sequence at a time on GPT-2 (a batch may not exceed its
    # 128-token context), BATCH sequences on SmolLM2; every sequence has the same length
    token_batch = tokens if data.variant != SMOLLM2 else BATCH * tokens
    with tempfile.TemporaryDirectory() as out:
        for name, ids in (("train", data.train), ("queries", data.queries)):
            with open(f"{out}/{name}.jsonl", "w") as f:
                for row in ids.tolist():
                    f.write(json.dumps({"input_ids": row, "labels": row}) + "\n")
        argv = ["bergson", "ekfac", f"{out}/run", "--model", str(data.model_dir)]
        argv += ["--data.dataset", f"{out}/train.jsonl", "--query.dataset", f"{out}/queries.jsonl"]
        argv += ["--method", "kfac", "--hessian_cfg.ev_correction", "true"]
        if data.fisher == "empirical":
            argv += ["--use_dataset_labels", "true"]
        argv += ["--score", "individual"]
        argv += ["--query.aggregation", "none", "--nproc_per_node", "1"]
        # Bergson 2.5.1 reads `--index_cfg.modules` nowhere (only the score step's own
        # `modules`, which defaults to every module of the query index): it tracks every
        # linear layer unless `--filter_modules` (comma-separated globs) excludes them
        argv += ["--token_batch_size", str(token_batch), "--filter_modules", BERGSON_EXCLUDE]
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
        seen = json.loads(Path(f"{out}/run/query/info.json").read_text())["grad_sizes"]
    if sorted(m.removeprefix(base) for m in seen) != sorted(modules):
        raise RuntimeError(f"Bergson tracked {sorted(seen)}, expected {modules}")
    for d in (stages.seconds, stages.cpu):
        d["scores"] = d.pop("total") - d["factors"]
    stages.peak_mib["scores"] = stages.peak_mib.pop("total")
    # (Q, N), Kronfluence's sign: ∇loss_qᵀ(G+λI)⁻¹∇L
    return {"scores": scores, "detail": tally.seconds, "token_batch": token_batch}


WORKERS = {
    "prepare": lambda data, stages: {},  # builds the variant's cache only
    "floor": run_floor,
    "influscope": run_influscope,
    "kronfluence": run_kronfluence,
    "bergson": run_bergson,
}
BERGSON_PYTHON = ROOT / ".venv-bergson" / "bin" / "python"


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = prepare_data(args.variant, args.n_train, args.n_queries, args.tokens)
    data.memory_gb = args.memory_gb
    stages = Stages()
    extra = WORKERS[args.worker](data, stages)
    print(json.dumps({**stages.result(), **extra}))


def sizes(args) -> tuple[int, int, int]:
    """``(training sequences, queries, tokens per sequence)`` of ``args.variant``."""
    if args.variant == SMOLLM2:
        return args.smollm2_sequences, args.smollm2_queries, args.smollm2_tokens
    return args.n_train, args.n_queries, SEQ


def spawn(name: str, args, memory_gb: str = "default") -> dict:
    python = str(BERGSON_PYTHON) if name == "bergson" else sys.executable
    n_train, n_queries, tokens = sizes(args)
    cmd = [python, "-m", "benchmarks.vs_kronfluence", "--worker", name]
    cmd += ["--variant", args.variant, "--memory-gb", memory_gb, "--tokens", str(tokens)]
    cmd += ["--n-train", str(n_train), "--n-queries", str(n_queries)]
    cmd += ["--threads", str(args.threads)]
    env = None
    if name == "bergson":  # its own venv; influscope and the benchmarks from this checkout
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        last = (out.stderr.strip().splitlines() or [""])[-1][:300]
        raise RuntimeError(f"worker {name} exited with {out.returncode}: {last}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_seconds"] = time.perf_counter() - start  # start-up and loading included
    # every worker's result is kept as it comes, so a later worker's failure loses nothing
    log = ROOT / ".cache" / "bench" / "vs_kronfluence_workers.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(json.dumps({"worker": name, "variant": args.variant, "memory_gb": memory_gb,
                             "threads": args.threads, "result": res}) + "\n")  # fmt: skip
    return res


def _verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    """``met`` or ``missed, by …`` (relative for ratios, absolute for correlations)."""
    if (value >= target) if higher_is_better else (value <= target):
        return "met"
    if higher_is_better:
        return f"**missed, by {target - value:.4f}**"
    return f"**missed, by {100 * (value / target - 1):.0f} %**"


def _rho(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over queries of the per-query Spearman correlation (rows of ``(Q, N)``)."""
    return sum(spearman(a[q], b[q]) for q in range(len(a))) / len(a)


def _table(ours: dict, theirs: dict, peer: str, stages: list[str]) -> list[str]:
    """Stage rows (with the fit's own steps indented) of influscope beside one peer."""
    rows = [f"| stage | influscope s | {peer} s | ratio | CPU-s ratio | influscope peak RSS "
            f"MiB | {peer} peak RSS MiB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    d1, d2 = ours.get("detail", {}), theirs.get("detail", {})
    details = {
        "factors": FACTOR_DETAIL,
        "scores": ("queries", "apply", "dot"),
    }
    for stage in stages:
        s1, s2 = ours["seconds"][stage], theirs["seconds"][stage]
        c1, c2 = ours["cpu_seconds"][stage], theirs["cpu_seconds"][stage]
        rows.append(
            f"| {LABEL[stage]} | {s1:.2f} | {s2:.2f} | {s1 / s2:.2f} | {c1 / c2:.2f} | "
            f"{ours['peak_mib'][stage]:.0f} | {theirs['peak_mib'][stage]:.0f} |"
        )
        for sub in details.get(stage, ()):
            if sub in d1 or sub in d2:
                x1, x2 = d1.get(sub), d2.get(sub)
                f1 = "–" if x1 is None else f"{x1:.2f}"
                f2 = "–" if x2 is None else f"{x2:.2f}"
                ratio = f"{x1 / x2:.2f}" if x1 and x2 else "–"
                rows.append(f"| {LABEL[sub]} | {f1} | {f2} | {ratio} | | | |")
    t1 = sum(ours["seconds"][k] for k in stages)
    t2 = sum(theirs["seconds"][k] for k in stages)
    c1 = sum(ours["cpu_seconds"][k] for k in stages)
    c2 = sum(theirs["cpu_seconds"][k] for k in stages)
    rows.append(
        f"| **total** | **{t1:.2f}** | **{t2:.2f}** | **{t1 / t2:.2f}** | **{c1 / c2:.2f}** | "
        f"**{ours['max_rss_mib']:.0f}** | **{theirs['max_rss_mib']:.0f}** |"
    )
    return rows


def bench_variant(args) -> tuple[list[str], tuple[float, float, float]]:
    n_train, n_queries, tokens = sizes(args)
    if args.variant == SMOLLM2:  # de-quantise once, in a subprocess, outside the timings
        spawn("prepare", args)
    else:
        prepare(args.variant, n_train, n_queries)  # train once, outside the timings
    names = ["floor", "influscope", "kronfluence"] + (["bergson"] if args.bergson else [])
    res = {name: spawn(name, args) for name in names}
    floor = res["floor"]["seconds"]["forward+backward"]
    ours, theirs = res["influscope"], res["kronfluence"]
    stages = ["factors"] + [k for k in SCORE_STAGE.values() if k in ours["seconds"]]
    a, b = torch.tensor(ours["scores"]), torch.tensor(theirs["scores"])
    rho = _rho(a, b)
    title = f"### `{args.variant}` ({n_train} train × {n_queries} queries"
    rows = [title + (f", {tokens} tokens each)" if args.variant == SMOLLM2 else ")"), ""]
    rows += _table(ours, theirs, "Kronfluence", stages)
    t1 = sum(ours["seconds"][k] for k in stages)
    t2 = sum(theirs["seconds"][k] for k in stages)
    c1 = sum(ours["cpu_seconds"][k] for k in stages)
    c2 = sum(theirs["cpu_seconds"][k] for k in stages)
    m1, m2 = ours["max_rss_mib"], theirs["max_rss_mib"]
    cf = res["floor"]["cpu_seconds"]["forward+backward"]
    rows += [
        "",
        f"- floor (one forward+backward over the {n_train} training sequences): "
        f"{floor:.2f} s → influscope = {t1 / floor:.2f} passes, Kronfluence = "
        f"{t2 / floor:.2f} passes (in CPU seconds: {c1 / cf:.2f} and {c2 / cf:.2f})",
        f"- Spearman(influscope, Kronfluence), full rank, mean over queries: {rho:.4f}; "
        f"flattened: {spearman(a.flatten(), b.flatten()):.4f}",
    ]
    rhos = [rho]
    if "scores_r32" in ours:
        a32, b32 = torch.tensor(ours["scores_r32"]), torch.tensor(theirs["scores_r32"])
        rho32 = _rho(a32, b32)
        rhos.append(rho32)
        rows.append(
            f"- Spearman(influscope, Kronfluence), rank 32, mean over queries: {rho32:.4f}; "
            f"rank 32 vs full rank within each library: influscope {_rho(a32, a):.4f}, "
            f"Kronfluence {_rho(b32, b):.4f}"
        )
    rows += [
        f"- targets (issue 22): total time ≤ 0.5× Kronfluence's — {t1 / t2:.2f}× wall "
        f"({c1 / c2:.2f}× CPU-s): {_verdict(t1 / t2, 0.5)}; peak RSS ≤ 1.0× Kronfluence's — "
        f"{m1:.0f} / {m2:.0f} MiB = {m1 / m2:.2f}×: {_verdict(m1 / m2, 1.0)}; Spearman ≥ 0.98"
        f" — {min(rhos):.4f}{' (the lower of full rank and rank 32)' if len(rhos) > 1 else ''}"
        f": {_verdict(min(rhos), 0.98, higher_is_better=True)}",
        f"- settings: {data_note(args.variant)}",
        "- worker processes, start to end (loading included): "
        + ", ".join(f"{k} {v['process_seconds']:.1f} s" for k, v in res.items()),
        f"- load average after the run (2-core machine, shared): {load_average()}",
        "",
    ]
    if args.bergson:
        rows[-1:-1] = _bergson_rows(ours, res["bergson"], a, args.variant)
    if args.budgets:
        rows[-1:-1] = _budget_rows(args, ours, theirs)
    return rows, (t1 / t2, rho, t1 / floor)


def data_note(variant: str) -> str:
    """The matched settings of a variant, in a line."""
    if variant == SMOLLM2:
        return (
            "SmolLM2-135M-Instruct (GGUF de-quantised to float32), EK-FAC over the 90 MLP "
            "projections, true Fisher (each library draws its own labels from the model, so "
            "the factors differ by sampling noise), damping 0.1 × mean(Λ) per module, batch "
            f"{BATCH}; totals add the factors and both score stages; peak = each worker's VmHWM"
        )
    return (
        "EK-FAC over the MLP c_fc/c_proj (as nn.Linear), empirical Fisher, damping "
        f"0.1 × mean(Λ) per module, full-rank queries, batch {BATCH}; peak = each worker's VmHWM"
    )


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
    runs = [("default", ours)]
    for b in args.budgets:  # a refused budget is a result (its row says why), not a crash
        try:
            runs.append((b, spawn("influscope", args, b)))
        except RuntimeError as exc:
            runs.append((b, {"refused": str(exc)}))
    for budget, res in runs:
        if "refused" in res:
            rows.append(f"| {budget} GiB | refused: {res['refused']} |" + " – |" * 8)
            continue
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


def _bergson_rows(ours: dict, peer: dict, a: torch.Tensor, variant: str) -> list[str]:
    """The second peer: Bergson's stage times and peaks beside influscope's (full rank)."""
    b = torch.tensor(peer["scores"])
    rows = ["", "Bergson 2.5.1 (`bergson ekfac`) as a second peer, full-rank scores:", ""]
    rows += _table(ours, peer, "Bergson", ["factors", "scores"])
    rows[-1] = rows[-1].replace("| **total** |", "| **total** (factors + full-rank scores) |")
    fisher = (
        "labels sampled by Bergson from the model (its default)"
        if variant == SMOLLM2
        else ("dataset labels (`--use_dataset_labels true`)")
    )
    rows += [
        "",
        f"- Spearman(influscope, Bergson), full rank, mean over queries: {_rho(a, b):.4f}",
        f"- Bergson's settings: K-FAC + eigenvalue correction over the same modules, {fisher}, "
        f"`damped_inverse` 0.1 × mean(Λ), `--token_batch_size {peer['token_batch']}`. "
        "Not matched: covariances accumulated in float32 (`hessian_dtype`; influscope "
        "float64, Kronfluence float32), no bias terms (GPT-2's c_fc/c_proj have biases, which "
        "the other two include; SmolLM2's projections have none), no low-rank query option "
        "(no rank-32 column). Bergson's scores stage = query gradients + applying the inverse "
        "+ scoring; the influscope peak beside it is its whole run's.",
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["small", "large"])
    parser.add_argument("--n-train", type=int, default=500, help="small/large: sequences")
    parser.add_argument("--n-queries", type=int, default=20, help="small/large: queries")
    parser.add_argument("--smollm2-sequences", type=int, default=120)
    parser.add_argument("--smollm2-tokens", type=int, default=96)
    parser.add_argument("--smollm2-queries", type=int, default=8)
    parser.add_argument("--report", default=None, help="Markdown file to update.")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads per worker (default 2, one per core of a quiet 2-core machine; "
        "use 1 on a loaded machine: two OpenMP threads on oversubscribed cores made one "
        "float64 eigendecomposition of a 1536 × 1536 factor 13× slower)",
    )
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
    parser.add_argument("--tokens", type=int, default=SEQ, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    command = (
        "`OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.vs_kronfluence "
        + " ".join(sys.argv[1:])
        + "`"
    )
    # GPT-2 variants share the `vs_kronfluence` section; SmolLM2 has its own, so that running
    # one does not overwrite the other's tables
    sections: dict[str, list[str]] = {}
    first = None
    for variant in args.variants:
        args.variant = variant
        rows, summary = bench_variant(args)
        print("\n".join(rows), flush=True)
        key = "vs_kronfluence_smollm2" if variant == SMOLLM2 else "vs_kronfluence"
        sections.setdefault(key, []).extend(rows)
        first = first or summary
    if args.report:
        for key, lines in sections.items():
            title = (
                "## EK-FAC on SmolLM2-135M: influscope vs Kronfluence 1.0.1 and Bergson 2.5.1"
                if key == "vs_kronfluence_smollm2"
                else "## EK-FAC vs Kronfluence 1.0.1"
            )
            head = [title, "", f"Command: {command}", ""]
            write_section(ROOT / args.report, key, "\n".join(head + lines))
    x, y, z = first
    print(
        f"total_ratio_vs_kronfluence={x:.3f} spearman_vs_kronfluence={y:.4f} passes_over_floor={z:.2f}"
    )


if __name__ == "__main__":
    main()
