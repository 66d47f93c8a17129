"""Unlearning planted facts: EK-FAC Newton step vs gradient ascent vs retraining.

Set-up: the demo corpus (Shakespeare windows + planted facts about invented entities, each fact
stated by 3 training sequences visited ``fact_repeats`` = 4 times per epoch), the demo GPT-2
(2 layers, width 64) trained on it. The forget set is the training sequences of ``--forget-facts``
facts that the model has learned (their query's answer is its top-1 next token). Measured:

* **forget**: mean ``log p(answer | held-out prompt)`` of the forgotten facts' queries, and the
  fraction whose answer is still the top-1 next token;
* **retain**: the same for the other facts (ideally unchanged);
* **held-out ppl**: perplexity on Shakespeare windows that are not in the corpus.

Methods: no-op; the Newton step ``Δθ = s (w/N) (G + λI)^{-1} Σ_{z∈D_f} ∇L(z)`` with EK-FAC,
its forget gradient taken over the whole forget sequences or over their answer tokens only (the
sequences as prompt + completion), on all tracked layers or the top-k layers by share of the
forget set's influence, for several scales ``s``; gradient ascent on the answer tokens of the
forget set, same layers, 5 steps whose norms add up to a multiple of the Newton (answer tokens,
s=1) step's norm; iterative Newton (``method="iterative"``: up to ``--rounds`` damped Newton steps
with EK-FAC refitted at the current parameters, a retain term on the other facts' answer tokens
and a backtracking line search; see ``ITERATIVE_PLAN``); retraining without the forget set (the gold standard) and retraining on all
data with another seed (how much a retrain moves things by itself).

Run (after ``make assets``; ~15 min of CPU on an idle 2-core machine)::

    .venv/bin/python -m benchmarks.unlearn --out runs/applications/unlearn

Writes ``results.json`` and ``table.md`` under ``--out`` (models are cached there too).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from benchmarks.app_common import fmt, heldout_texts, query_metrics, token_nll, train_cached, visits
from benchmarks.unlearn_baselines import gradient_ascent
from influscope.analyzer import Influence
from influscope.applications.unlearn import UnlearnConfig, unlearn
from influscope.config import FitConfig
from influscope.demo.corpus import build_demo_corpus
from influscope.demo.train import DemoTrainConfig, evaluate_queries, train_tokenizer
from influscope.storage import atomic_write_json
from influscope.tasks import CausalLMTask

COMMAND = ".venv/bin/python -m benchmarks.unlearn --out runs/applications/unlearn"


#: The iterative rows: (label, UnlearnConfig options). β = retain_weight; "bound" =
#: max_retain_increase (nats of mean retain answer-token loss); "target" = forget_target.
ITERATIVE_PLAN: list[tuple[str, dict]] = [
    ("β=0, s=1, refit every round, bound 3", dict(scale=1.0, max_retain_increase=3.0)),
    (
        "β=4, s=1, refit every round, bound 3",
        dict(scale=1.0, retain_weight=4.0, max_retain_increase=3.0),
    ),
    (
        "β=4, s=1, refit every round, bound 3, top-layers auto (80 %)",
        dict(scale=1.0, retain_weight=4.0, max_retain_increase=3.0, top_layers="auto"),
    ),
    (
        "β=4, s=1, first fit kept (no refit), bound 3",
        dict(scale=1.0, retain_weight=4.0, max_retain_increase=3.0, refit_every=0),
    ),
    (
        "β=4, s=1, refit every 2nd round, bound 3",
        dict(scale=1.0, retain_weight=4.0, max_retain_increase=3.0, refit_every=2),
    ),
    (
        "β=4, s=1, refit every round, bound 3, target +15 nats",
        dict(scale=1.0, retain_weight=4.0, max_retain_increase=3.0, forget_target=15.0),
    ),
    (
        "β=4, s=1, refit every round, bound 3, target +15 nats with retain ≤ +1",
        dict(
            scale=1.0,
            retain_weight=4.0,
            max_retain_increase=3.0,
            forget_target=15.0,
            stop_retain_increase=1.0,
        ),
    ),
    ("β=4, s=2, refit every round", dict(scale=2.0, retain_weight=4.0)),
    (
        "β=4, s=2, refit every round, target +15 nats",
        dict(scale=2.0, retain_weight=4.0, forget_target=15.0),
    ),
]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/applications/unlearn")
    p.add_argument("--assets", default=None)
    p.add_argument("--n-facts", type=int, default=40)
    p.add_argument("--n-chunks", type=int, default=300)
    p.add_argument("--forget-facts", type=int, default=4)
    p.add_argument("--modules", default="all", help="Tracked modules (preset or regex).")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--seq-scales", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--top-layers", type=int, nargs="+", default=[2])
    p.add_argument("--top-scales", type=float, nargs="+", default=[4.0, 8.0])
    p.add_argument("--ga-steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=8, help="Rounds of the iterative rows.")
    p.add_argument(
        "--ga-budgets",
        type=float,
        nargs="+",
        default=[0.1, 0.3, 1.0, 4.0],
        help="Gradient-ascent path lengths, in units of the Newton (answer tokens) s=1 norm.",
    )
    p.add_argument("--heldout", type=int, default=60, help="Held-out Shakespeare windows.")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


@dataclass
class Setup:
    """Everything the rows share: models, data, metrics, the fitted curvature."""

    args: argparse.Namespace
    out: Path
    model: Any
    tokenizer: Any
    corpus: Any
    settings: DemoTrainConfig
    records: list
    all_visits: list[int]
    forget_ids: list[str]
    forget_idx: list[int]
    task: CausalLMTask
    inf: Influence
    train: Any
    train_visits: Any
    forget_sets: dict
    retain_set: Any
    factors: Any = None
    t_train: float = 0.0
    t_fit: float = 0.0
    forget_q: list = field(default_factory=list)
    retain_q: list = field(default_factory=list)
    heldout: list = field(default_factory=list)

    def evaluate(self, m) -> dict[str, float]:
        f = query_metrics(m, self.tokenizer, self.forget_q)
        r = query_metrics(m, self.tokenizer, self.retain_q)
        return {
            "forget_logprob": f["logprob"],
            "forget_top1": f["top1"],
            "retain_logprob": r["logprob"],
            "retain_top1": r["top1"],
            "heldout_ppl": float(
                torch.exp(torch.tensor(token_nll(m, self.tokenizer, self.heldout)))
            ),
        }


def prepare(args: argparse.Namespace) -> Setup:
    """Corpus, tokenizer, the trained (cached) model, forget / retain sets, EK-FAC at θ_0."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = build_demo_corpus(args.assets, args.n_facts, args.n_chunks, seed=args.seed)
    settings = DemoTrainConfig(epochs=args.epochs, seed=args.seed)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(corpus.texts, settings.vocab_size)
        tokenizer.model_max_length = settings.n_positions
        tokenizer.save_pretrained(tok_dir)
    records = corpus.records
    all_visits = visits(records, settings.fact_repeats)
    model, t_train = train_cached(
        out / "model", records, tokenizer, settings, all_visits, args.seed
    )

    # Forget the first facts the model has learned (answer = top-1 next token).
    learned = evaluate_queries(model, tokenizer, corpus.queries).first_top1
    ranked = [q["fact_id"] for q, ok in zip(corpus.queries, learned) if ok]
    ranked += [q["fact_id"] for q, ok in zip(corpus.queries, learned) if not ok]
    forget_ids = ranked[: args.forget_facts]
    forget_idx = sorted(i for f in forget_ids for i in corpus.fact_indices(f))
    task = CausalLMTask(add_bos=False)  # the demo model is trained without a BOS token
    inf = Influence(model, task, modules=args.modules, tokenizer=tokenizer, device="cpu")
    train = inf.encode(records, truncate=True)
    facts = {f.fact_id: f for f in corpus.facts}
    forget_sets = {
        "whole sequences": train.subset(forget_idx),
        # The same sequences as prompt + completion: their loss covers the answer tokens only.
        "answer tokens": inf.encode([answer_split(records[i], facts) for i in forget_idx]),
    }
    drop = set(forget_idx)
    setup = Setup(
        args=args,
        out=out,
        model=model,
        tokenizer=tokenizer,
        corpus=corpus,
        settings=settings,
        records=records,
        all_visits=all_visits,
        forget_ids=forget_ids,
        forget_idx=forget_idx,
        task=task,
        inf=inf,
        train=train,
        train_visits=train.subset(all_visits),
        forget_sets=forget_sets,
        # Retain set of the iterative method: the answer tokens of every other fact's training
        # sequences (prompt + completion, like the forget set). Only training data: the retain
        # *queries* (held-out wording) are never seen by the method.
        retain_set=inf.encode(
            [
                answer_split(r, facts)
                for i, r in enumerate(records)
                if r.get("fact_id") and i not in drop
            ]
        ),
        t_train=t_train,
        forget_q=[q for q in corpus.queries if q["fact_id"] in forget_ids],
        retain_q=[q for q in corpus.queries if q["fact_id"] not in forget_ids],
        heldout=heldout_texts(args.assets, corpus.texts, args.heldout, args.seed),
    )
    t1 = time.perf_counter()
    setup.factors = inf.fit(setup.train_visits, FitConfig(curvature="ekfac"))
    setup.t_fit = time.perf_counter() - t1
    return setup


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    su = prepare(args)
    model, tokenizer, records, settings = su.model, su.tokenizer, su.records, su.settings
    task, inf, train, train_visits, factors = su.task, su.inf, su.train, su.train_visits, su.factors
    forget_sets, forget_idx, all_visits, out = su.forget_sets, su.forget_idx, su.all_visits, su.out
    evaluate, t_train, t_fit = su.evaluate, su.t_train, su.t_fit
    forget_ids = su.forget_ids

    base = evaluate(model)
    rows: list[dict] = []

    def add(method: str, m, seconds: float, **extra) -> None:
        metrics = evaluate(m)
        distance = sum(
            float((p.detach() - q.detach()).double().square().sum())
            for p, q in zip(m.parameters(), model.parameters())
        )
        rows.append(
            {"method": method, **metrics, "param_distance": distance**0.5, "seconds": seconds}
            | extra
        )
        print(json.dumps(rows[-1]), flush=True)

    add("no-op", model, 0.0)

    # --- Newton step (EK-FAC, fitted once on the training objective's visits) --------------
    newton_norm: dict[tuple, float] = {}
    shares: dict[str, dict] = {}
    plan = [("whole sequences", None, s) for s in args.seq_scales]
    plan += [("answer tokens", None, s) for s in args.scales]
    plan += [("answer tokens", k, s) for k in args.top_layers for s in args.top_scales]
    for target, k, scale in plan:
        t2 = time.perf_counter()
        config = UnlearnConfig(
            scale=scale,
            top_layers=k,
            forget_weight=settings.fact_repeats,
            n_train=len(train_visits),
        )
        res = unlearn(
            model, task, train, forget_sets[target], factors=factors, modules=args.modules,
            config=config,
        )  # fmt: skip
        shares[target] = res.report.layer_shares
        label = "all" if k is None else f"top-{k}"
        newton_norm[(target, label, scale)] = (
            sum(v**2 for v in res.report.step_norms.values()) ** 0.5
        )
        add(
            f"Newton ({target}), {label} layers, s={scale:g}",
            res.model,
            time.perf_counter() - t2,
            layers=res.report.edited_layers,
            forget_loss_increase=res.report.forget_loss_after - res.report.forget_loss_before,
            predicted_increase=res.report.predicted_loss_increase,
        )

    # --- iterative Newton: refitted EK-FAC, retain term, line search -------------------------
    for label, options in ITERATIVE_PLAN:
        t4 = time.perf_counter()
        config = UnlearnConfig(
            method="iterative",
            rounds=args.rounds,
            forget_weight=settings.fact_repeats,
            n_train=len(train_visits),
            **options,
        )
        res = unlearn(
            model, task, train, forget_sets["answer tokens"], factors=factors,
            modules=args.modules, config=config, retain=su.retain_set, fit_data=train_visits,
            fit_config=FitConfig(curvature="ekfac"),
        )  # fmt: skip
        r = res.report
        add(
            f"iterative Newton (answer tokens), {label} → {len(r.rounds)} rounds, "
            f"stop: {r.stop_reason}",
            res.model,
            time.perf_counter() - t4,
            layers=r.edited_layers,
            options=options,
            rounds=r.rounds,
            stop_reason=r.stop_reason,
            forget_loss_increase=r.forget_loss_after - r.forget_loss_before,
            retain_loss_before=r.retain_loss_before,
            retain_loss_after=r.retain_loss_after,
        )

    # --- gradient ascent: same layers, answer tokens, budget = multiples of the s=1 step's norm
    unit = newton_norm[("answer tokens", "all", 1.0)]
    for mult in args.ga_budgets:
        t3 = time.perf_counter()
        ga = gradient_ascent(
            model,
            task,
            forget_sets["answer tokens"],
            inf.layer_names,
            step_norm=mult * unit / args.ga_steps,
            steps=args.ga_steps,
        )
        add(
            f"gradient ascent (answer tokens), {args.ga_steps} steps, ‖Δθ‖ ≤ {mult:g}× Newton s=1",
            ga,
            time.perf_counter() - t3,
        )

    # --- retraining ---------------------------------------------------------------------------
    keep = [i for i in all_visits if i not in set(forget_idx)]
    retrained, t_re = train_cached(
        out / "retrain_without_forget", records, tokenizer, settings, keep, args.seed
    )
    add("retrain without forget set (gold)", retrained, t_re)
    other, t_o = train_cached(
        out / "retrain_all_seed1", records, tokenizer, settings, all_visits, args.seed + 1
    )
    add("retrain on all data, other seed (noise)", other, t_o)

    result = {
        "command": COMMAND,
        "settings": vars(args),
        "forget_facts": forget_ids,
        "n_forget_sequences": len(forget_idx),
        "n_train_records": len(records),
        "n_train_visits": len(all_visits),
        "layer_shares": shares,
        "damping": factors.damping,
        "base": base,
        "rows": rows,
        "seconds": {"train": t_train, "fit": t_fit, "total": time.perf_counter() - t0},
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_json(out / "results.json", result)
    (out / "table.md").write_text(table(result))
    print(table(result))
    return 0


def answer_split(record: dict, facts: dict) -> dict:
    """A fact sequence as ``{"prompt": text before the answer, "completion": " answer."}``."""
    text, answer = record["text"], facts[record["fact_id"]].answer
    cut = text.rfind(" " + answer)
    if cut < 0:
        raise ValueError(f"answer {answer!r} not found in {text!r}")
    return {"prompt": text[:cut], "completion": text[cut:]}


def table(result: dict) -> str:
    """Markdown table: changes relative to the original model."""
    b = result["base"]
    lines = [
        f"Original model: forget log p {b['forget_logprob']:.2f} (top-1 {b['forget_top1']:.2f}), "
        f"retain log p {b['retain_logprob']:.2f} (top-1 {b['retain_top1']:.2f}), held-out ppl "
        f"{b['heldout_ppl']:.1f}.",
        "",
        "| method | Δ forget log p | forget top-1 | Δ retain log p | retain top-1 | held-out ppl | ‖Δθ‖ |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {fmt(r['forget_logprob'] - b['forget_logprob'])} | "
            f"{fmt(r['forget_top1'])} | {fmt(r['retain_logprob'] - b['retain_logprob'])} | "
            f"{fmt(r['retain_top1'])} | {fmt(r['heldout_ppl'], 1)} | {fmt(r['param_distance'], 1)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
