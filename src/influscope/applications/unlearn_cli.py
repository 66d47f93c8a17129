"""``influscope unlearn``: remove training sequences with one EK-FAC Newton step, save the model.

::

    influscope unlearn MODEL_DIR --train train.jsonl --forget 3,17,40-45 --out edited/
    influscope unlearn MODEL_DIR --train train.jsonl --forget forget.jsonl --out edited/ \\
        --scale 2 --top-layers 2 --run runs/x

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

from influscope.cli_options import (
    add_batch_size_option,
    add_curvature_option,
    add_device_option,
    add_model_argument,
    add_modules_option,
    add_task_option,
    add_truncate_option,
    resolve_modules,
)
from influscope.errors import DataError


def add_parser(sub, common=None) -> argparse.ArgumentParser:
    """Register the ``unlearn`` sub-command on ``sub`` (an argparse sub-parsers object)."""
    p = sub.add_parser(
        "unlearn",
        help="Remove training sequences with one Newton step; save the edited HF model.",
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
    p.add_argument("--scale", type=float, default=1.0, help="Step scale s (default 1).")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--layers", nargs="+", default=None, help="Edit only these tracked layers.")
    group.add_argument(
        "--top-layers",
        type=int,
        default=None,
        help="Edit only the k layers with the largest share of the forget set's influence.",
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
    add_truncate_option(p)
    add_device_option(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing --out directory and refit stored factors.",
    )
    return p


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


def cmd_unlearn(args) -> int:
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
    )
    model, tokenizer = load_model(args.model, args.task)
    modules = resolve_modules(args.modules)
    inf = Influence(
        model, args.task, modules=modules, run_dir=args.run, tokenizer=tokenizer, device=args.device
    )
    train = inf.encode(load_records(args.train), truncate=args.truncate)
    indices = parse_forget(args.forget, len(train))
    forget = (
        indices
        if indices is not None
        else inf.encode(load_records(args.forget), truncate=args.truncate)
    )
    fit_config = FitConfig(curvature=args.curvature, batch_size=args.batch_size)
    factors = inf.fit(train, fit_config, name=args.factors, overwrite=args.overwrite)
    result = unlearn(
        inf.model,
        inf.task,
        train,
        forget,
        factors=factors,
        modules=modules,
        config=config,
        inplace=True,
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
    console.print(
        f"[green]unlearned[/green] {r.n_forget} sequences (N = {r.n_train}, scale {r.scale:g}) "
        f"via {len(r.edited_layers)} layers; forget-set loss {r.forget_loss_before:.3f} → "
        f"{r.forget_loss_after:.3f} (first-order prediction +{r.predicted_loss_increase:.3f}) "
        f"→ {out}"
    )
    return 0
