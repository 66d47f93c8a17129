"""Every generalisation probe on the demo model (and, with ``--smollm2``, on SmolLM2-135M).

Writes the tables between the ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers of
``docs/probes.md``, the plots to ``docs/figures/probes/*.svg`` and everything measured to
``runs/probes/results.json``. The demo model is the one ``make demo`` trains (``runs/demo``);
it is trained here with the same pipeline when missing.

Run (after ``make assets``; the demo part took 7 minutes on 2 CPU cores shared with other
jobs, ``--smollm2`` adds about 10)::

    .venv/bin/python -m benchmarks.probes --assets .cache/assets [--smollm2]

Demo probes:

- **ID vs OOD**: held-out Shakespeare chunks and fact queries (ID), paraphrased and French
  fact queries and modern movie-review sentences (OOD); training domains "shakespeare" and
  "planted facts".
- **length**: a copy task trained up to L = 8 symbols and scored up to 4L; and the demo's fact
  prompts behind held-out Shakespeare text up to the 128-token context (L = the longest
  planted-fact training sequence).
- **prompting**: held-out-lead-in and paraphrased fact queries with 0–8 demonstrations of other
  facts, with and without a chain-of-thought style prefix.
- **representation**: per-layer linear probes of the relation of fact sentences, the domain of
  training sequences and the sentiment of movie reviews, with permuted-label controls, beside
  the per-block influence share of the fact queries.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influscope.analysis.layers import layer_study
from influscope.assets import shakespeare_texts, vader_movie_reviews
from influscope.demo.corpus import DemoCorpus, shakespeare_chunks
from influscope.demo.facts import make_queries
from influscope.demo.pipeline import direct_fact_queries
from influscope.probes import (
    CopyTaskConfig,
    IdOodConfig,
    InfluenceSide,
    PromptingConfig,
    RepresentationConfig,
    block_influence_share,
    copy_records,
    distractor_records,
    id_ood_probe,
    length_probe,
    prompting_probe,
    representation_probe,
    train_copy_model,
)
from influscope.storage import atomic_write_json
from influscope.storage.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python -m benchmarks.probes --assets .cache/assets"
COT = "Let us think step by step."


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_demo(assets: Path, run: Path):
    """The demo model, tokenizer and corpus (trained by the demo pipeline when missing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (run / "model" / "corpus.json").is_file():
        from influscope.demo.pipeline import run_demo

        _log(f"no demo run at {run}: running the demo pipeline")
        run_demo(assets, run)
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    return model, tok, DemoCorpus.load(run / "model" / "corpus.json")


def held_out_chunks(assets: Path, corpus: DemoCorpus, n: int, words: int, seed: int) -> list[str]:
    """Shakespeare windows that are not training records."""
    seen = set(corpus.texts)
    texts = shakespeare_texts(assets)
    chunks = shakespeare_chunks(texts, 4 * n, words, seed)
    return [c["text"] for c in chunks if c["text"] not in seen][:n]


def movie_reviews(assets: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` movie-review sentences (balanced by sign of the rating), 8–30 words."""
    rows = [(s, r) for s, r in vader_movie_reviews(assets) if r != 0 and 8 <= len(s.split()) <= 30]
    rng = random.Random(seed)
    pos = rng.sample([s for s, r in rows if r > 0], n // 2)
    neg = rng.sample([s for s, r in rows if r < 0], n - n // 2)
    return [{"text": s, "sentiment": "positive"} for s in pos] + [
        {"text": s, "sentiment": "negative"} for s in neg
    ]


def with_relation(corpus: DemoCorpus, queries: list[dict]) -> list[dict]:
    rel = {f.fact_id: f.relation for f in corpus.facts}
    return [dict(q, relation=rel[q["fact_id"]]) for q in queries]


def demo_probes(args, out: Path) -> dict[str, Any]:
    model, tok, corpus = load_demo(args.assets, args.run)
    train = [
        dict(r, domain="planted facts" if r.get("fact_id") else "shakespeare")
        for r in corpus.records
    ]
    t0 = time.perf_counter()
    side = InfluenceSide(model, tok, train)
    _log(f"EK-FAC fit on {len(train)} demo sequences: {time.perf_counter() - t0:.0f} s")
    taught = with_relation(corpus, direct_fact_queries(corpus))
    context = list(corpus.queries)
    paraphrase = make_queries(corpus.facts, style="paraphrase")
    french = make_queries(corpus.facts, lang="fr")
    n = args.n_eval
    results: dict[str, Any] = {}

    _log("ID vs OOD")
    seen_chunks = [{"text": r["text"]} for r in train if not r.get("fact_id")][:n]
    sets = {
        "shakespeare, training chunks (seen)": seen_chunks,
        "shakespeare, held-out chunks": [
            {"text": t} for t in held_out_chunks(args.assets, corpus, n, 48, seed=101)
        ],
        # With the final period, exactly the training sentences (the shift measures' zero).
        "facts, taught wording (seen)": [dict(q, completion=q["completion"] + ".") for q in taught][
            :n
        ],
        "facts, held-out lead-in": context[:n],
        "facts, paraphrased (OOD)": paraphrase[:n],
        "facts, in French (OOD)": french[:n],
        "movie reviews (OOD)": [{"text": r["text"]} for r in movie_reviews(args.assets, n, 5)],
    }
    res = id_ood_probe(model, tok, train, sets, IdOodConfig(top_k=10), influence=side)
    results["id_ood"] = res.to_dict()
    atomic_write_text(out / "demo_id_ood.svg", res.svg("Demo model: domain-classifier AUC"))
    tables = {"demo-id-ood": res.markdown()}

    _log("length: copy task")
    copy_cfg = CopyTaskConfig(
        train_max_length=8,
        eval_max_length=32,
        n_train=3000,
        n_embd=64,
        n_head=4,
        epochs=10,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    cmodel, ctok, ctrain = train_copy_model(copy_cfg)
    copy_seconds = time.perf_counter() - t0
    cside = InfluenceSide(cmodel, ctok, ctrain)
    cres = length_probe(
        cmodel,
        ctok,
        copy_records(range(1, 33), args.n_per_length, copy_cfg.n_symbols, seed=7),
        copy_cfg.train_max_length,
        influence=cside,
    )
    results["length_copy"] = cres.to_dict() | {"config": copy_cfg.__dict__}
    results["length_copy"]["train_seconds"] = copy_seconds
    atomic_write_text(out / "copy_length.svg", cres.svg("Copy task trained to L = 8"))
    tables["copy-length"] = cres.markdown()

    _log("length: facts behind distractors")
    fact_len = max(len(tok(r["text"])["input_ids"]) for r in train if r.get("fact_id"))
    # 0: the bare prompt (no distractor); then total lengths from L to the 128-token context.
    lengths = sorted({0, fact_len, 24, 34, 51, 4 * fact_len, 85, 102, 127})
    distract = held_out_chunks(args.assets, corpus, len(taught), 110, seed=202)
    drecs = distractor_records(taught, distract, tok, lengths)
    dres = length_probe(model, tok, drecs, fact_len, influence=side)
    results["length_facts"] = dres.to_dict()
    atomic_write_text(
        out / "demo_fact_length.svg", dres.svg(f"Demo facts behind distractors (L = {fact_len})")
    )
    tables["demo-fact-length"] = dres.markdown()

    _log("prompting")
    # Demonstrations: the other facts' taught sentences without their lead-in (8 fit the context).
    demos = [dict(q, prompt=q["prompt"].split(". ", 1)[-1]) for q in taught]
    config = PromptingConfig(ks=(0, 1, 2, 4, 8), separator=" ", cot_prefix=COT)
    pres = prompting_probe(model, tok, context, demos, config, influence=side)
    para = prompting_probe(
        model, tok, with_relation(corpus, paraphrase), demos, config, influence=side
    )
    results["prompting_context"] = pres.to_dict()
    results["prompting_paraphrase"] = para.to_dict()
    atomic_write_text(out / "demo_prompting.svg", pres.svg("Demo: held-out lead-in queries"))
    atomic_write_text(out / "demo_prompting_paraphrase.svg", para.svg("Demo: paraphrased queries"))
    tables["demo-prompting"] = pres.markdown()
    tables["demo-prompting-paraphrase"] = para.markdown()

    _log("representation")
    scores = side.scores(context, per_layer=True)
    study = layer_study(scores)
    share = block_influence_share(study.layer_names, study.abs_share)
    fact_recs = [r for r in train if r.get("fact_id")]
    rng = random.Random(3)
    mixed = rng.sample([r for r in train if not r.get("fact_id")], len(fact_recs)) + fact_recs
    reviews = movie_reviews(args.assets, args.n_sentiment, 11)
    records = (
        [{"text": r["text"], "relation": r["relation"]} for r in fact_recs]
        + [{"text": r["text"], "domain": r["domain"]} for r in mixed]
        + reviews
    )
    rres = representation_probe(
        model,
        tok,
        records,
        ["relation", "domain", "sentiment"],
        RepresentationConfig(folds=5),
        influence_share=share,
    )
    results["representation"] = rres.to_dict()
    atomic_write_text(out / "demo_representation.svg", rres.svg("Demo: probe accuracy per layer"))
    tables["demo-representation"] = rres.markdown()
    for name, table in tables.items():
        _log(f"{name}\n{table}")
    return {"results": results, "tables": tables}


# --- SmolLM2 --------------------------------------------------------------------------------
def _capitals() -> list[tuple[str, str]]:
    return [
        ("France", "Paris"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Germany", "Berlin"),
        ("Japan", "Tokyo"),
        ("Egypt", "Cairo"),
        ("Russia", "Moscow"),
        ("Greece", "Athens"),
        ("Portugal", "Lisbon"),
        ("Austria", "Vienna"),
        ("Poland", "Warsaw"),
        ("Norway", "Oslo"),
        ("Sweden", "Stockholm"),
        ("Ireland", "Dublin"),
        ("Kenya", "Nairobi"),
        ("Peru", "Lima"),
        ("Cuba", "Havana"),
        ("Chile", "Santiago"),
        ("Finland", "Helsinki"),
        ("Hungary", "Budapest"),
    ]


def smollm2_tasks(seed: int) -> dict[str, list[dict[str, Any]]]:
    """Simple generated tasks: one-digit addition, next letter, antonym-free capitals."""
    rng = random.Random(seed)
    add = []
    for i in range(40):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        add.append(
            {
                "prompt": f"{a} + {b} =",
                "completion": f" {a + b}",
                "fact_id": f"add{i}",
                "relation": "add",
            }
        )
    letters = "abcdefghijklmnopqrstuvwxy"
    nxt = [
        {
            "prompt": f"The letter after {c} is",
            "completion": f" {chr(ord(c) + 1)}",
            "fact_id": f"next{c}",
            "relation": "next",
        }
        for c in letters
    ]
    caps = [
        {
            "prompt": f"The capital of {c} is",
            "completion": f" {a}",
            "fact_id": c,
            "relation": "capital",
        }
        for c, a in _capitals()
    ]
    return {"one-digit addition": add, "next letter": nxt, "capital cities": caps}


def smollm2_candidates(args) -> tuple[list[dict], dict[str, list[dict]]]:
    """A labelled candidate set (SmolLM2's own training data is not available) and eval sets.

    Domains: one-digit sums, capital-city sentences, Shakespeare chunks. Evaluation: new sums
    (in distribution), capitals asked as questions (new wording), movie reviews (OOD).
    """
    rng = random.Random(args.seed + 1)
    caps = _capitals()
    cand = []
    for _ in range(24):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        cand.append({"text": f"{a} + {b} = {a + b}", "domain": "arithmetic"})
    cand += [{"text": f"The capital of {c} is {a}.", "domain": "capitals"} for c, a in caps]
    chunks = shakespeare_chunks(shakespeare_texts(args.assets), 24, 24, seed=args.seed + 3)
    cand += [{"text": c["text"], "domain": "shakespeare"} for c in chunks]
    sums = []
    for _ in range(args.n_smol):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        sums.append({"prompt": f"{a} + {b} =", "completion": f" {a + b}"})
    questions = [
        {"prompt": f"Q: What is the capital of {c}? A:", "completion": f" {a}"}
        for c, a in caps[: args.n_smol]
    ]
    reviews = [{"text": r["text"]} for r in movie_reviews(args.assets, args.n_smol, 17)]
    evals = {
        "arithmetic, new sums": sums,
        "capitals, question form": questions,
        "movie reviews (OOD)": reviews,
    }
    return cand, evals


def smollm2_probes(args, out: Path) -> dict[str, Any]:
    from influscope.assets import smollm2_gguf
    from influscope.loading import load_model

    t0 = time.perf_counter()
    model, tok = load_model(smollm2_gguf(args.assets))
    _log(f"SmolLM2 loaded in {time.perf_counter() - t0:.0f} s")
    results: dict[str, Any] = {}
    tables: dict[str, str] = {}
    config = PromptingConfig(ks=(0, 1, 2, 4, 8), separator="\n", cot_prefix=COT)
    rows = []
    for name, task in smollm2_tasks(args.seed).items():
        queries, demos = task[: args.n_smol], task
        res = prompting_probe(model, tok, queries, demos, config)
        results[f"prompting {name}"] = res.to_dict()
        rows.append((name, res))
        atomic_write_text(
            out / f"smollm2_prompting_{re.sub(r'[^a-z]+', '_', name)}.svg",
            res.svg(f"SmolLM2-135M: {name}"),
        )
    head = ["task", *(f"k={k}" for k in config.ks), *(f"k={k} + prefix" for k in config.ks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in rows:
        cells = [f"{a:.2f}" for a in res.accuracy["plain"] + res.accuracy["cot"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tables["smollm2-prompting"] = "\n".join(lines)

    _log("SmolLM2 length: in-context copy")
    rng = random.Random(args.seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    recs = []
    for n in (2, 4, 8, 16, 32, 64):  # after one demonstration of length L = 4
        for _ in range(args.n_smol):
            s = " ".join(rng.choice(letters) for _ in range(n))
            demo = " ".join(rng.choice(letters) for _ in range(4))
            recs.append(
                {
                    "prompt": f"Copy: {demo}\nResult: {demo}\nCopy: {s}\nResult:",
                    "completion": f" {s}",
                    "length": n,
                }
            )
    lres = length_probe(model, tok, recs, train_max_length=4, batch_size=4)
    results["length_copy"] = lres.to_dict()
    tables["smollm2-length"] = lres.markdown()
    atomic_write_text(out / "smollm2_copy_length.svg", lres.svg("SmolLM2-135M: 1-shot copy"))

    _log("SmolLM2 ID vs OOD over a candidate set (EK-FAC on the 30 MLP down-projections)")
    candidates, evals = smollm2_candidates(args)
    t0 = time.perf_counter()
    side = InfluenceSide(model, tok, candidates, modules=r"mlp\.down_proj$")
    _log(f"SmolLM2 EK-FAC fit on {len(candidates)} candidates: {time.perf_counter() - t0:.0f} s")
    ores = id_ood_probe(
        model, tok, candidates, evals, IdOodConfig(top_k=5, folds=3), influence=side, batch_size=4
    )
    results["id_ood"] = ores.to_dict()
    side.normalize = "relatif"
    rel = id_ood_probe(
        model, tok, candidates, evals, IdOodConfig(top_k=5, folds=3), influence=side, batch_size=4
    )
    side.normalize = None
    results["id_ood_relatif"] = rel.to_dict()
    tables["smollm2-id-ood"] = ores.markdown()
    tables["smollm2-id-ood-relatif"] = rel.markdown()
    scores = side.scores(evals["capitals, question form"], per_layer=True)
    study = layer_study(scores)
    share = block_influence_share(study.layer_names, study.abs_share)

    _log("SmolLM2 representation")
    reviews = movie_reviews(args.assets, args.n_smol_sentiment, 11)
    random_labels = [dict(r, coin=random.Random(i).random() < 0.5) for i, r in enumerate(reviews)]
    rres = representation_probe(
        model,
        tok,
        random_labels,
        ["sentiment", "coin"],
        RepresentationConfig(folds=5),
        influence_share=share,
    )
    results["representation"] = rres.to_dict()
    tables["smollm2-representation"] = rres.markdown()
    atomic_write_text(
        out / "smollm2_representation.svg", rres.svg("SmolLM2-135M: probe accuracy per layer")
    )
    return {"results": results, "tables": tables}


def write_doc(doc: Path, tables: dict[str, str], command: str) -> None:
    """Replace each ``<!-- BEGIN name -->…<!-- END name -->`` block of ``doc``."""
    text = doc.read_text()
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            _log(f"no block {name!r} in {doc}; skipped")
            continue
        body = f"```bash\n{command}\n```\n\n{table}\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    atomic_write_text(doc, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", type=Path, default=ROOT / ".cache" / "assets", help="Asset cache.")
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "demo", help="Demo run directory.")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "probes", help="Results directory.")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "probes.md", help="Doc to update.")
    p.add_argument(
        "--figures", type=Path, default=ROOT / "docs" / "figures" / "probes", help="SVG folder."
    )
    p.add_argument("--n-eval", type=int, default=40, help="Examples per ID/OOD set.")
    p.add_argument("--n-per-length", type=int, default=20, help="Copy examples per length.")
    p.add_argument("--n-sentiment", type=int, default=200, help="Movie reviews probed.")
    p.add_argument("--n-smol", type=int, default=8, help="SmolLM2 queries per task.")
    p.add_argument("--n-smol-sentiment", type=int, default=100, help="Reviews probed in SmolLM2.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the generated data.")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1).")
    p.add_argument("--smollm2", action="store_true", help="Also probe SmolLM2-135M.")
    p.add_argument("--skip-demo", action="store_true", help="Only SmolLM2 (with --smollm2).")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # trained copy model and scores identical across machines
    args.figures.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    previous = {}
    if path.is_file():
        import json

        previous = json.loads(path.read_text())
    command = COMMAND + (" --smollm2" if args.smollm2 else "")
    if args.skip_demo:
        command += " --skip-demo"
    if not args.skip_demo:
        demo = demo_probes(args, args.figures)
        previous["demo"] = demo["results"]
        write_doc(args.doc, demo["tables"], command)
        atomic_write_json(path, previous)
    if args.smollm2:
        smol = smollm2_probes(args, args.figures)
        previous["smollm2"] = smol["results"]
        write_doc(args.doc, smol["tables"], command)
        atomic_write_json(path, previous)
    _log(f"results → {path}, doc → {args.doc}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
