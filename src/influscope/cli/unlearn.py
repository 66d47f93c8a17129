"""``influscope unlearn``: remove training sequences with EK-FAC Newton steps, save the model.

::

    influscope unlearn MODEL_DIR --train train.jsonl --forget 3,17,40-45 --out edited/
    influscope unlearn MODEL_DIR --train train.jsonl --forget forget.jsonl --out edited/ \\
        --scale 2 --top-layers 2 --run runs/x
    influscope unlearn MODEL_DIR --train train.jsonl --forget forget.jsonl --out edited/ \\
        --method iterative --rounds 8 --retain retain.jsonl --retain-weight 4 --top-layers auto

``--forget`` is either a records file (the sequences to remove) or training indices
(``3,17,40-45``). The edited model is written with ``save_pretrained`` (plus the tokenizer) so that
``AutoModelForCausalLM.from_pretrained(DIR)`` loads it; ``DIR/unlearn.json`` holds the report
(edited layers, their share of the forget set's influence, step norms, the forget set's loss before
and after and its first-order prediction).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from influscope.cli.options import (
    LazyChoices,
    add_batch_size_option,
    add_curvature_option,
    add_damping_options,
    add_device_option,
    add_model_argument,
    add_modules_option,
    add_task_option,
    add_truncate_option,
    check_writable,
    damping_kwargs,
    encode_records,
    resolve_modules,
)
from influscope.errors import DataError

NAME = "unlearn"
HELP = "Remove training sequences with one or iterated Newton steps; save the edited model."


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``unlearn`` on ``sub`` (the main parser's sub-parsers)."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        description=__doc__.split("\n")[0].replace("``", ""),
    )
    add_model_argument(p, positional=True)
    p.add_argument(
        "--train",
        required=True,
        help="The training records the model was trained on (.jsonl/.json/.txt or a saved "
        "HF dataset); their number is N in the step (1/N)(G + λI)⁻¹ Σ ∇L.",
    )
    p.add_argument(
        "--forget",
        required=True,
        help="Sequences to remove: a records file, or training indices like '3,17,40-45'.",
    )
    p.add_argument("--out", required=True, help="Directory for the edited model + unlearn.json.")
    p.add_argument("--scale", type=float, default=1.0, help="Step scale s (default: %(default)s).")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layers", nargs="+", default=None, help="Edit only these tracked layers.")
    group.add_argument(
        "--top-layers",
        type=top_layers_arg,
        default=None,
        help="Edit only the k layers with the largest share of the forget set's influence; "
        "'auto': the fewest layers whose shares add up to --coverage.",
    )
    p.add_argument(
        "--coverage",
        type=float,
        default=0.8,
        help="Share of the forget set's influence --top-layers auto must cover (default 0.8).",
    )
    p.add_argument(
        "--method",
        choices=LazyChoices("influscope.applications.unlearn", "METHODS"),
        default="newton",
        help="newton: one Newton step; iterative: repeated damped Newton steps with the "
        "curvature refitted at the current parameters and a line search (default newton).",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="Iterative: the largest number of Newton steps (0 = no change; default 5).",
    )
    p.add_argument(
        "--refit-every",
        type=int,
        default=1,
        help="Iterative: refit the curvature every k rounds (0 = keep the first fit; default 1).",
    )
    p.add_argument(
        "--retain",
        default=None,
        help="Iterative: sequences to keep (records file or training indices); default: the "
        "training records not in --forget when --forget gives indices.",
    )
    p.add_argument(
        "--retain-weight",
        type=float,
        default=0.0,
        help="Iterative: weight β of the retain term, each round ascends mean forget loss − β "
        "mean retain loss (default: %(default)s).",
    )
    p.add_argument(
        "--forget-target",
        type=float,
        default=None,
        help="Iterative: stop once the forget set's mean loss rose by this many nats.",
    )
    p.add_argument(
        "--stop-retain-increase",
        type=float,
        default=None,
        help="Iterative, with --forget-target: stop only once the retain set's mean loss is "
        "also within this many nats of the original model's.",
    )
    p.add_argument(
        "--max-retain-increase",
        type=float,
        default=None,
        help="Iterative: reject steps that raise the retain set's mean loss by more than this "
        "many nats over the original model (default: no bound).",
    )
    add_modules_option(p)
    add_task_option(p, help="How a batch becomes a loss (default: causal_lm).")
    add_curvature_option(p, help="Curvature of the step (default: ekfac).")
    p.add_argument(
        "--run",
        default=None,
        help="Run directory: fitted factors are stored / reused there (default: in memory).",
    )
    p.add_argument("--factors", default="factors", help="Name of the factors stage in --run.")
    p.add_argument(
        "--forget-weight",
        type=float,
        default=1.0,
        help="Weight of each forget sequence in the training objective (e.g. its repeats).",
    )
    p.add_argument(
        "--n-train", type=int, default=None, help="N of the objective (default: #train)."
    )
    add_batch_size_option(p)
    add_damping_options(p)
    add_truncate_option(p)
    add_device_option(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing --out directory and refit stored factors.",
    )
    p.set_defaults(func=run)
    return p


def top_layers_arg(value: str) -> int | str:
    """``--top-layers``: a positive integer or ``auto``."""
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'auto', received {value!r}"
        ) from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', received {k}")
    return k


def parse_forget(spec: str, n_train: int) -> list[int] | None:
    """``'3,17,40-45'`` → indices (checked against ``n_train``); ``None`` if ``spec`` is a file."""
    if Path(spec).exists():
        return None
    indices: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                indices.extend(range(lo, hi + 1))
            elif part:
                indices.append(int(part))
    except ValueError:
        raise DataError(
            f"--forget {spec!r} is neither an existing records file nor a list of training "
            "indices. Expected a path (forget.jsonl) or indices such as '3,17,40-45'."
        ) from None
    if not indices:
        raise DataError(f"--forget {spec!r} names no training index.")
    bad = [i for i in indices if not 0 <= i < n_train]
    if bad:
        raise DataError(
            f"--forget indices {bad[:5]} are outside the training set (0 … {n_train - 1})."
        )
    return indices


def run(args: argparse.Namespace) -> int:
    """Run ``influscope unlearn``: fit or load curvature, take the step, save model + report."""
    from rich.console import Console

    from influscope.analyzer import Influence
    from influscope.applications.unlearn import UnlearnConfig, unlearn
    from influscope.config import FitConfig
    from influscope.loading import load_model, load_records
    from influscope.storage import atomic_write_json

    console = Console(stderr=True)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DataError(
            f"--out {str(out)!r} exists and is not empty. Choose a new directory or pass "
            "--overwrite to replace it."
        )
    config = UnlearnConfig(
        scale=args.scale,
        layers=tuple(args.layers) if args.layers else None,
        top_layers=args.top_layers,
        forget_weight=args.forget_weight,
        n_train=args.n_train,
        batch_size=args.batch_size,
        method=args.method,
        coverage=args.coverage,
        rounds=args.rounds,
        refit_every=args.refit_every,
        retain_weight=args.retain_weight,
        forget_target=args.forget_target,
        stop_retain_increase=args.stop_retain_increase,
        max_retain_increase=args.max_retain_increase,
    )
    train_records = load_records(args.train)  # before the model is loaded
    check_writable(out.parent, "directory of --out")
    model, tokenizer = load_model(args.model, args.task)
    modules = resolve_modules(args.modules)
    inf = Influence(
        model, args.task, modules=modules, run_dir=args.run, tokenizer=tokenizer, device=args.device
    )
    train = encode_records(inf, train_records, args.train, args.truncate)
    indices = parse_forget(args.forget, len(train))
    forget = (
        indices
        if indices is not None
        else inf.encode(load_records(args.forget), truncate=args.truncate)
    )
    retain = None
    if args.retain is not None:
        retain_idx = parse_forget(args.retain, len(train))
        retain = (
            retain_idx
            if retain_idx is not None
            else inf.encode(load_records(args.retain), truncate=args.truncate)
        )
    fit_config = FitConfig(
        curvature=args.curvature, batch_size=args.batch_size, **damping_kwargs(args)
    )
    factors = inf.fit(train, fit_config, name=args.factors, overwrite=args.overwrite)
    result = unlearn(
        inf.tracked.model,
        inf.tracked.task,
        train,
        forget,
        factors=factors,
        modules=modules,
        config=config,
        inplace=True,
        retain=retain,
        fit_config=fit_config,
    )
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    result.model.cpu().save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    report = {
        **result.report.to_dict(),
        "model": str(args.model),
        "train": str(args.train),
        "forget": str(args.forget),
        "modules": args.modules,
    }
    atomic_write_json(tmp / "unlearn.json", report)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    r = result.report
    if r.method == "iterative":
        console.print(
            f"{len(r.rounds)} Newton rounds (stopped: {r.stop_reason}); retain-set mean loss "
            f"{r.retain_loss_before} → {r.retain_loss_after}"
        )
    console.print(
        f"[green]unlearned[/green] {r.n_forget} sequences (N = {r.n_train}, scale {r.scale:g}) "
        f"via {len(r.edited_layers)} layers; forget-set loss {r.forget_loss_before:.3f} → "
        f"{r.forget_loss_after:.3f} (first-order prediction +{r.predicted_loss_increase:.3f}) "
        f"→ {out}"
    )
    return 0
