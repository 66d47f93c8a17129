"""The studies of generalization on the planted-facts corpus, at two model sizes.

Builds one corpus (Shakespeare chunks plus planted facts about invented entities) in which

* **group L** (language probes): facts stated only in English, forward order, asked in English,
  French, German and Spanish, and in reversed order in English;
* **group T** (templates): facts stated in all four languages, so that the model learns the
  French, German and Spanish templates at all (never queried);
* **group O** (word-order probes): facts stated in both orders, asked in both orders;

trains the demo GPT-2 at two widths on it, fits EK-FAC on the MLP layers, scores every query
against every training sequence with per-layer terms, runs every study with
:func:`influscope.analysis.report_run` (the code behind ``influscope report``), and writes the
findings to ``docs/studies.md`` and the reports to ``runs/studies/<size>/studies.html``.

Run (after ``make assets``; well over 20 minutes on 2 CPU cores shared with other jobs)::

    .venv/bin/python -m benchmarks.studies

``--quick`` shrinks everything for a smoke test (the findings are then meaningless).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from influscope.analysis import SparsityConfig, StudyConfig, report_run
from influscope.analyzer import Influence
from influscope.assets import shakespeare_texts
from influscope.config import FitConfig, ScoreConfig
from influscope.demo.corpus import PLANTED_SOURCE, DemoCorpus, shakespeare_chunks
from influscope.demo.facts import make_facts, make_queries, make_training_records
from influscope.demo.templates import LANGUAGES
from influscope.demo.train import DemoTrainConfig, train_demo_model
from influscope.report import write_report
from influscope.storage import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"narrow": {"n_layer": 3, "n_embd": 64}, "wide": {"n_layer": 3, "n_embd": 128}}
COMMAND = ".venv/bin/python -m benchmarks.studies"


def build_corpus(assets: Path, n_l: int, n_t: int, n_o: int, n_chunks: int, seed: int):
    """The three fact groups (see the module docstring) mixed with Shakespeare chunks."""
    texts = shakespeare_texts(assets)
    vocab = {w for t in texts.values() for w in re.findall(r"[a-z]+", t.lower())}
    facts = make_facts(n_l + n_t + n_o, seed, forbidden=vocab)
    group_l, group_t, group_o = facts[:n_l], facts[n_l : n_l + n_t], facts[n_l + n_t :]
    records = make_training_records(group_l, langs=("en",), k=3, seed=seed)
    records += make_training_records(group_t, langs=LANGUAGES, k=3, seed=seed)
    for order in ("forward", "reversed"):
        records += make_training_records(group_o, langs=("en",), k=2, order=order, seed=seed)
    for rec in records:
        rec["source"] = PLANTED_SOURCE
    records += shakespeare_chunks(texts, n_chunks, 48, seed)
    random.Random(seed + 1).shuffle(records)
    queries = [q for lang in LANGUAGES for q in make_queries(group_l, lang=lang)]
    queries += make_queries(group_l, order="reversed")
    queries += [q for o in ("forward", "reversed") for q in make_queries(group_o, order=o)]
    settings = {"n_l": n_l, "n_t": n_t, "n_o": n_o, "n_chunks": n_chunks, "seed": seed}
    return DemoCorpus(records=records, queries=queries, facts=facts, settings=settings)


def planted_top1(scores: torch.Tensor, train: list[dict], queries: list[dict]) -> dict[str, Any]:
    """Top-1 accuracy (the top proponent states the query's fact) per query language/order."""
    out: dict[str, list[bool]] = {}
    for q, rec in enumerate(queries):
        top = int(scores[q].argmax())
        key = f"{rec['lang']} {rec['order']}"
        out.setdefault(key, []).append(train[top].get("fact_id") == rec["fact_id"])
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def run_size(name: str, corpus: DemoCorpus, out: Path, args) -> dict[str, Any]:
    """Train, fit, score and study one model size; return the findings."""
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    epochs = {"epochs": args.epochs} if args.epochs else {}
    settings = DemoTrainConfig(seed=args.seed, **epochs, **SIZES[name])
    model, tokenizer, training = train_demo_model(corpus, out / "model", settings)
    t_train = time.perf_counter() - t0
    inf = Influence(model, "causal_lm", modules="mlp", run_dir=out, tokenizer=tokenizer)
    train = inf.encode(corpus.records, truncate=True)
    queries = inf.encode(corpus.queries, truncate=True)
    factors = inf.fit(train, FitConfig(curvature="ekfac"), overwrite=True)
    config = ScoreConfig(query_rank=32, per_layer=True)
    scores = inf.score(queries, train, factors, config, name="scores", overwrite=True)
    t_score = time.perf_counter() - t0 - t_train
    atomic_write_json(out / "data.json", {"records": corpus.records, "queries": corpus.queries})
    study_config = StudyConfig(sparsity=SparsityConfig(n_bootstrap=args.bootstrap), top_k=5)
    view, studies = report_run(out, config=study_config, title=f"influscope studies — {name}")
    write_report(view, out / "studies.html")
    summaries = {k: v.to_dict().get("summary") for k, v in studies.items()}
    return {
        "size": name,
        "n_parameters": training["n_parameters"],
        "final_loss": training["epoch_losses"][-1],
        "answer_first_token_top1": training["queries"]["first_token_top1_accuracy"],
        "planted_top1": planted_top1(scores.pairwise, corpus.records, corpus.queries),
        "studies": summaries,
        "seconds": {
            "train": round(t_train, 1),
            "fit+score": round(t_score, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }


USAGE = """
## Running the studies on your own run

```
influscope fit    --model M --train train.jsonl --run RUN
influscope score  --model M --train train.jsonl --queries queries.jsonl --run RUN
influscope report RUN --model M --train train.jsonl --queries queries.jsonl   # → RUN/studies.html
```

`influscope report` renders the run into one self-contained HTML file (no network): overview, each
query's top proponents and opponents with per-token colouring, the layer heatmap, and every study
its inputs allow (sparsity always; layers with per-layer scores; overlap with texts; languages and
word order with planted-fact records carrying `fact_id`, `lang`, `order`; tokens with a model). The
numbers are also written to `RUN/studies.json`. From Python:

```python
from influscope.analysis import sparsity_study, layer_study, overlap_study, language_study
from influscope.analysis import word_order_study, token_study, report_run

fits = sparsity_study(scores)  # Scores or (Q, N) tensor
layers = layer_study(scores)  # needs ScoreConfig(per_layer=True)
overlap = overlap_study(scores, query_texts, train_texts)  # BM25 (or method="tfidf")
langs = language_study(scores, query_records, train_records)  # records with fact_id / lang
order = word_order_study(scores, query_records, train_records)  # records with fact_id / order
view, studies = report_run("RUN")  # what `influscope report` does
```

Each result has `.to_dict()` (JSON) and `.to_section()` (a report section).
"""


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def markdown(results: list[dict], corpus: DemoCorpus, args, command: str) -> str:
    """The findings as a Markdown page (numbers only from ``results``)."""
    s = corpus.settings
    sizes = [r["size"] for r in results]
    head = "| | " + " | ".join(sizes) + " |\n|---|" + "---|" * len(sizes) + "\n"

    def row(label: str, get) -> str:
        cells = []
        for r in results:
            try:
                cells.append(_f(get(r)))
            except (KeyError, TypeError):
                cells.append("–")
        return f"| {label} | " + " | ".join(cells) + " |\n"

    def st(r, *keys):
        value = r["studies"]
        for k in keys:
            value = value[k]
        return value

    lines = [
        "# Studies of generalization on the planted-facts corpus\n\n",
        "Generated by `benchmarks/studies.py` (do not edit by hand). Reproduce with\n\n",
        f"```\n{command}\n```\n\n",
        "(after `make assets`; CPU, deterministic seeds; it also writes the HTML reports to "
        "`runs/studies/<size>/studies.html`, which `influscope report runs/studies/<size>` "
        "re-renders).\n\n",
        "## Setup\n\n",
        f"* Corpus: {s['n_chunks']} Shakespeare chunks of 48 words plus planted facts about "
        f"invented entities: {s['n_l']} facts stated only in English (3 forward sentences each), "
        f"asked in en/fr/de/es and in reversed order; {s['n_t']} facts stated in all four "
        f"languages (so the templates are learnt; never asked); {s['n_o']} facts stated in both "
        f"orders (2 sentences each), asked in both orders. {len(corpus.records)} training "
        f"sequences, {len(corpus.queries)} queries.\n",
        "* Models: the demo GPT-2 (byte-level BPE trained on the corpus, dropout off), "
        + ", ".join(
            f"**{r['size']}** = {SIZES[r['size']]['n_layer']} layers × width "
            f"{SIZES[r['size']]['n_embd']} ({r['n_parameters']:,} parameters)"
            for r in results
        )
        + f", {args.epochs or DemoTrainConfig().epochs} epochs.\n",
        "* Influence: EK-FAC (true Fisher, damping 0.1 × mean eigenvalue) on the MLP layers, "
        "rank-32 queries, per-layer terms; measurement log p(completion | prompt); positive = "
        "up-weighting the training sequence raises it.\n",
        f"* Sparsity goodness-of-fit: {args.bootstrap} bootstrap sets per query.\n\n",
        "## Results\n\n",
        head,
        row("final training loss (per sequence)", lambda r: r["final_loss"]),
        row("answer first-token top-1 (all queries)", lambda r: r["answer_first_token_top1"]),
    ]
    keys = sorted({k for r in results for k in r["planted_top1"]})
    lines += [
        row(f"top-1 proponent states the fact: {k}", lambda r, k=k: r["planted_top1"][k])
        for k in keys
    ]
    lines += [
        row("sparsity: median α", lambda r: st(r, "sparsity", "median_alpha")),
        row("sparsity: median GoF p", lambda r: st(r, "sparsity", "median_p_value")),
        row("sparsity: fraction p ≥ 0.1", lambda r: st(r, "sparsity", "fraction_p_above_0.1")),
        row(
            "sparsity: lognormal preferred (R < 0)",
            lambda r: st(r, "sparsity", "fraction_lognormal_preferred"),
        ),
        row(
            "sparsity: exponential preferred (R < 0)",
            lambda r: st(r, "sparsity", "fraction_exponential_preferred"),
        ),
        row(
            "sparsity: top-1% share of positive influence",
            lambda r: st(r, "sparsity", "median_top_share"),
        ),
        row("overlap: mean Spearman(influence, BM25)", lambda r: st(r, "overlap", "mean_spearman")),
        row("overlap: mean Pearson(influence, BM25)", lambda r: st(r, "overlap", "mean_pearson")),
        row(
            "overlap: top-10 sharing a content word",
            lambda r: st(r, "overlap", "mean_top_k_shared"),
        ),
        row(
            "overlap: all sequences sharing one (chance)",
            lambda r: st(r, "overlap", "mean_chance_shared"),
        ),
    ]
    for third in ("lower", "middle", "upper"):
        lines.append(
            row(
                f"layers: {third}-third share",
                lambda r, t=third: st(r, "layers", "thirds", t, "mean_share"),
            )
        )
    for third in ("lower", "middle", "upper"):
        lines.append(
            row(
                f"layers: {third}-third Spearman vs full",
                lambda r, t=third: st(r, "layers", "thirds", t, "mean_spearman_vs_full"),
            )
        )
    for lang in ("fr", "de", "es"):
        lines.append(
            row(
                f"languages: median ratio {lang}/en",
                lambda r, lang=lang: st(r, "languages", lang, "median_ratio"),
            )
        )
        lines.append(
            row(
                f"languages: mean percentile of the English sequences, {lang} query",
                lambda r, lang=lang: st(r, "languages", lang, "mean_percentile"),
            )
        )
    lines += [
        row(
            "languages: mean percentile, en query",
            lambda r: st(r, "languages", "en", "mean_percentile"),
        ),
        row(
            "word order: median ratio reversed query / forward query",
            lambda r: st(r, "word_order", "reversed_query_ratio", "median"),
        ),
        row(
            "word order: median ratio key phrase after / before completion",
            lambda r: st(r, "word_order", "key_after_completion_ratio", "median"),
        ),
    ]
    grid_keys = sorted({k for r in results for k in r["studies"]["word_order"]["grid"]})
    lines += [
        row(
            f"word order: mean percentile, {k}",
            lambda r, k=k: st(r, "word_order", "grid", k, "mean_percentile"),
        )
        for k in grid_keys
    ]
    lines += [
        row(
            "tokens: mean ℓ2/ℓ1 of shown sequences", lambda r: st(r, "tokens", "mean_concentration")
        ),
        row(
            "tokens: fraction of proponents with ℓ2/ℓ1 > 2/3",
            lambda r: st(r, "tokens", "fraction_concentrated_proponents"),
        ),
        row(
            "seconds (train / fit+score / total)",
            lambda r: (
                f"{r['seconds']['train']} / {r['seconds']['fit+score']} / {r['seconds']['total']}"
            ),
        ),
        "\n## What the numbers say\n\n",
        *findings(results),
        "\nReading the ratios: a ratio is the fact's summed (languages) or mean-per-sequence "
        "(word order) influence on the probe query divided by the same on the baseline query, "
        "median over facts with a positive baseline; a percentile is the mean rank of the fact's "
        "training sequences among all scored sequences for the query (1 = top, 0.5 = chance). "
        "The definitions and formulas are in the docstrings of `influscope.analysis.*`.\n",
        USAGE,
    ]
    return "".join(lines)


def findings(results: list[dict]) -> list[str]:
    """Plain sentences derived from the numbers (no hand-written claims)."""
    out = []
    for r in results:
        s = r["studies"]
        wo = s["word_order"]
        rq, ka = wo["reversed_query_ratio"]["median"], wo["key_after_completion_ratio"]["median"]

        def verdict(x):
            if x is None:
                return "undefined (no fact with a positive baseline)"
            if x < 0.5:
                return f"{x:.2g}: the asymmetry is shown (well below 1)"
            return f"{x:.2g}: no strong asymmetry"

        langs = {k: v["median_ratio"] for k, v in s["languages"].items() if k != "en"}
        pct = {k: v["mean_percentile"] for k, v in s["languages"].items()}
        sp = s["sparsity"]
        out.append(
            f"* **{r['size']}**: power-law tails fitted for {sp['n_fitted']}/{sp['n_queries']} "
            f"queries, median α = {_f(sp['median_alpha'])}, median GoF p = "
            f"{_f(sp['median_p_value'])}; the top 1% of sequences hold a median "
            f"{_f(sp['median_top_share'])} of the positive influence. Reversed-query ratio "
            f"{verdict(rq)}; key-after-completion ratio {verdict(ka)}. Cross-lingual ratios "
            + ", ".join(f"{k} {_f(v)}" for k, v in langs.items())
            + " (percentiles "
            + ", ".join(f"{k} {_f(v)}" for k, v in pct.items())
            + f"). Influence vs BM25: mean Spearman {_f(s['overlap']['mean_spearman'])}.\n"
        )
    if len(results) == 2:
        a, b = results
        sa, sb = a["studies"]["overlap"]["mean_spearman"], b["studies"]["overlap"]["mean_spearman"]
        if sa is not None and sb is not None:
            trend = "less" if sb < sa else "more"
            out.append(
                f"* From {a['size']} to {b['size']}, influence follows BM25 overlap {trend} "
                f"(Spearman {sa:.3g} → {sb:.3g}); at this scale this is one seed of tiny "
                "models, not evidence about large ones.\n"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--assets", type=Path, default=ROOT / ".cache" / "assets")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "studies")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "studies.md")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--epochs", type=int, default=None, help="Default: DemoTrainConfig's (tuned for the demo)."
    )
    parser.add_argument("--bootstrap", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Tiny smoke run.")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="Rewrite the doc from OUT/findings.json without recomputing.",
    )
    args = parser.parse_args(argv)
    if args.quick:
        corpus = build_corpus(args.assets, 4, 4, 4, 40, args.seed)
        args.epochs, args.bootstrap = 2, 2
    else:
        corpus = build_corpus(args.assets, 10, 8, 6, 120, args.seed)
    if args.render_only:
        results = json.loads((args.out / "findings.json").read_text())
        args.doc.write_text(markdown(results, corpus, args, COMMAND), encoding="utf-8")
        return 0
    results = []
    for size in args.sizes:
        print(f"[studies] {size}: training and scoring …", file=sys.stderr, flush=True)
        results.append(run_size(size, corpus, args.out / size, args))
        print(json.dumps(results[-1], indent=1, default=str), file=sys.stderr, flush=True)
    argv_str = " ".join(argv if argv is not None else sys.argv[1:])
    command = f"{COMMAND} {argv_str}".strip()
    atomic_write_json(args.out / "findings.json", results)
    if not args.quick:
        args.doc.write_text(markdown(results, corpus, args, command), encoding="utf-8")
        print(f"[studies] findings → {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
