"""``influscope bias``: rank a reward model's training pairs by how much they taught a bias.

    influscope bias --model DIR --train train.jsonl --validation val.jsonl --out bias.json
    influscope bias --model DIR --train train.jsonl --validation heldout.jsonl --select shorter

``--validation`` holds the targeted pairs (the behaviour the bias harms is ``chosen``); with
``--select shorter`` the pairs whose chosen response is the shorter are picked out of any
held-out set. ``--model`` is a Hugging Face sequence classifier with one label, or a directory
written by :meth:`FrozenEncoderReward.save`. If the training records carry a boolean field
named by ``--flag-field`` (the synthetic data's ``flipped``), the ROC-AUC of each ranking for it
is reported too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from influscope.cli.options import (
    add_curvature_option,
    add_device_option,
    add_modules_option,
    check_writable,
    resolve_modules,
)
from influscope.errors import DataError

__all__ = ["NAME", "add_parser", "run"]

NAME = "bias"
HELP = "Rank reward-model training pairs by influence on a targeted validation set."


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``bias`` on ``sub`` (the main parser's sub-parsers)."""
    from influscope.applications.reward_bias import BASELINES, MEASUREMENTS
    from influscope.applications.reward_data import SELECTORS

    p = sub.add_parser(
        NAME,
        help=HELP,
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    p.add_argument(
        "--model",
        required=True,
        help="Reward model directory: a Hugging Face sequence classifier with one label, or "
        "one written by FrozenEncoderReward.save.",
    )
    p.add_argument("--train", required=True, help="Training pairs: prompt, chosen, rejected.")
    p.add_argument("--validation", required=True, help="Targeted validation pairs.")
    p.add_argument(
        "--select",
        default=None,
        choices=list(SELECTORS),
        help="Keep only the validation pairs satisfying this rule (default: all of them).",
    )
    add_curvature_option(p, help="Curvature of the targeted influence (default: ekfac).")
    p.add_argument(
        "--measurement",
        default="log_likelihood",
        choices=list(MEASUREMENTS),
        help="Per validation pair: log_likelihood, log σ(r_c − r_r) (minus its loss), or the "
        "margin r_c − r_r (default: %(default)s).",
    )
    add_modules_option(p, default=None, help="Tracked modules (default: auto).")
    p.add_argument(
        "--baselines",
        nargs="*",
        default=list(BASELINES),
        help=f"Also compute these rankings (default: {' '.join(BASELINES)}; none: no value).",
    )
    p.add_argument("--batch-size", type=int, default=64, help="Pairs per pass (default 64).")
    p.add_argument(
        "--damping-factor",
        type=float,
        default=0.1,
        help="Damping = factor × mean eigenvalue per layer (default 0.1; see `influscope damping`).",
    )
    p.add_argument("--top-k", type=int, default=10, help="Suspects printed and saved in full.")
    p.add_argument("--flag-field", default="flipped", help="Known-bias field for the AUC.")
    p.add_argument("--out", default="bias.json", help="JSON file with every pair's scores.")
    add_device_option(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``influscope bias``: rank the training pairs, print the suspects, write JSON."""
    from rich.console import Console
    from rich.table import Table

    from influscope.applications.reward_bias import BiasDetectionConfig, rank_biased_pairs
    from influscope.applications.reward_data import select_targeted
    from influscope.applications.reward_encoder import load_reward_model
    from influscope.loading import load_records
    from influscope.storage import atomic_write_json

    console = Console()
    config = BiasDetectionConfig(
        curvature=args.curvature,
        measurement=args.measurement,
        batch_size=args.batch_size,
        baselines=tuple(args.baselines),
        damping_factor=args.damping_factor,
    )
    train = load_records(args.train)  # data files are checked before the model is loaded
    validation = load_records(args.validation)
    check_writable(Path(args.out).parent, "directory of --out")
    model, tokenizer = load_reward_model(args.model)
    if args.select:
        validation = select_targeted(validation, args.select)
    if args.top_k < 0:
        raise DataError(f"--top-k must be ≥ 0, received {args.top_k}.")
    modules = resolve_modules(args.modules)
    ranking = rank_biased_pairs(
        model, tokenizer, train, validation, config, modules=modules, device=args.device
    )
    order = ranking.order("influence")
    out: dict = {
        "config": config.to_dict(),
        "n_train": len(train),
        "n_validation": len(validation),
        "sign": "suspicion = −influence on the validation measurement; higher = inspect first",
        "scores": {m: s.tolist() for m, s in ranking.scores.items()},
        "top": [
            {"index": int(i), "suspicion": float(ranking.scores["influence"][i]), **train[i]}
            for i in order[: args.top_k]
        ],
    }
    flags = [r.get(args.flag_field) for r in train]
    if all(isinstance(f, bool) for f in flags) and 0 < sum(flags) < len(flags):
        out["auc"] = ranking.auc(np.array(flags))
    path = Path(args.out)
    atomic_write_json(path, out)

    table = Table(title=f"Most suspicious of {len(train)} training pairs")
    for col in ("#", "index", "suspicion", "chosen", "rejected"):
        table.add_column(col)
    for rank, i in enumerate(order[: args.top_k], 1):
        rec = train[i]
        table.add_row(
            str(rank),
            str(int(i)),
            f"{ranking.scores['influence'][i]:.3g}",
            str(rec["chosen"])[:60],
            str(rec["rejected"])[:60],
        )
    console.print(table)
    if "auc" in out:
        aucs = ", ".join(f"{m} {v:.3f}" for m, v in out["auc"].items())
        console.print(f"ROC-AUC for '{args.flag_field}': {aucs}")
    console.print(f"scores → {path}")
    return 0
