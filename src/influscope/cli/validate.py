"""``influscope validate``: build a validation bank of your fine-tune, score attributions on it.

Example::

    # the full fine-tune (saved to BANK/model) and leave-k%-out retrains, resumable
    influscope validate build --model base/ --train train.jsonl --queries q.jsonl \\
        --bank runs/bank --epochs 1 --lr 1e-4 --fractions 0.05 --subsets 8
    # attribute on the bank's full-run model, then score that attribution on the bank
    influscope fit   --model runs/bank/model --train train.jsonl --run runs/ekfac
    influscope score --model runs/bank/model --train train.jsonl --queries q.jsonl --run runs/ekfac
    influscope validate score --bank runs/bank --run runs/ekfac

``validate score --top-k 5 ...`` also runs the top-k removal test, which retrains, so it takes
the same model, data and recipe options as ``build``. Under ``torchrun`` the ranks split the
retrains (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from influscope.cli.options import (
    add_device_option,
    add_recipe_options,
    add_task_option,
    add_truncate_option,
    recipe_from_args,
)

NAME = "validate"
HELP = "Build a counterfactual validation bank of your fine-tune; score attributions on it."

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``validate`` on ``sub`` (the main parser's sub-parsers)."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        description="build: run your fine-tune on all training rows (twice: it must be "
        "deterministic) and without random leave-k%-out subsets, storing each query "
        "measurement (resumable). score: the LDS of a stored attribution per drop fraction "
        "(Spearman over subsets, mean ± s.e.m. over queries) and, with --top-k, the "
        "remove-top-k-proponents vs k-random retraining test. See docs/validation.md.",
    )
    p.add_argument("action", choices=["build", "score"], help="What to do (see above).")
    p.add_argument("--bank", required=True, help="Bank directory (BANK/bank/<name>).")
    p.add_argument("--name", default="bank", help="Bank stage name (default: bank).")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the subsets (build) and of the random removals (score) (default: 0).",
    )
    g = p.add_argument_group("model, data and recipe (build; score with --top-k)")
    g.add_argument("--model", default=None, help="Base model: a Hugging Face directory or .gguf.")
    g.add_argument(
        "--adapter",
        default=None,
        help="PEFT (LoRA) adapter on top of --model (default: none); its matrices are "
        "trained and BANK/model then holds the trained adapter.",
    )
    g.add_argument("--train", default=None, help="Training records (.jsonl/.json/.txt).")
    g.add_argument("--queries", default=None, help="Query records (.jsonl).")
    add_task_option(g)
    add_truncate_option(g)
    add_device_option(g)
    add_recipe_options(g)  # --epochs --lr --train-batch-size --train-seed … --parameters
    g.add_argument(
        "--recipe",
        default=None,
        help="Your own training function instead of the built-in recipe: FILE.py:FUNC, "
        "called as FUNC(model, task, train, weights) -> trained model (default: built-in).",
    )
    g.add_argument(
        "--measure-batch-size", type=int, default=8, help="Queries per pass (default: 8)."
    )
    b = p.add_argument_group("build")
    b.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.01, 0.05, 0.5],
        help="Leave-k-out drop fractions (default: 0.01 0.05 0.5).",
    )
    b.add_argument("--subsets", type=int, default=8, help="Subsets per fraction (default: 8).")
    b.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="Allowed relative gap between two full runs (0: bit-identical).",
    )
    b.add_argument(
        "--no-save-model",
        action="store_true",
        help="Do not save the full-run model to BANK/model (default: saved, to score it).",
    )
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="Rebuild a stored bank (default: reuse it when it matches, refuse when stale).",
    )
    s = p.add_argument_group("score")
    s.add_argument("--run", default=None, help="Run directory holding the scores stage.")
    s.add_argument("--scores", default="scores", help="Scores stage name (default: scores).")
    s.add_argument(
        "--top-k",
        type=int,
        nargs="*",
        default=[],
        help="Removal sizes of the top-k test (default: none, LDS only; retrains).",
    )
    s.add_argument(
        "--removal-queries",
        type=int,
        default=None,
        help="Run the removal test on the first N queries (default: all).",
    )
    s.add_argument(
        "--out",
        default=None,
        help="JSON result (default: RUN/validation/<scores>.json, which `influscope report "
        "RUN` shows as a section).",
    )
    p.set_defaults(func=run)
    return p


def _require(args: argparse.Namespace, *names: str, why: str) -> None:
    from influscope.errors import ConfigError

    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"{why} needs {', '.join(missing)}; received none.")


def _load_function(spec: str):
    """``FILE.py:FUNC`` → (the function, its file's source text)."""
    import importlib.util

    from influscope.errors import ConfigError

    path, _, func = spec.rpartition(":")
    if not path or not func or not Path(path).is_file():
        raise ConfigError(
            f"--recipe must be FILE.py:FUNC with an existing file, received {spec!r}."
        )
    mod_spec = importlib.util.spec_from_file_location("influscope_user_recipe", path)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not callable(getattr(module, func, None)):
        raise ConfigError(f"{path} defines no function {func!r} (from --recipe {spec!r}).")
    return getattr(module, func), Path(path).read_text() + f"\n#{func}"


def _setup(args: argparse.Namespace):
    """``(BankRecipe, model, tokenizer)`` from the model, data and recipe options."""
    import torch

    from influscope.evaluation.bank_recipe import callable_recipe, finetune_recipe
    from influscope.loading import load_model, load_records
    from influscope.tasks import get_task
    from influscope.tasks.causal_lm import context_length
    from influscope.tasks.data import record_list

    _require(args, "model", "train", "queries", why=f"validate {args.action}")
    # the built-in recipe's settings are checked before the model loads
    config = None if args.recipe else recipe_from_args(args)
    model, tokenizer = load_model(args.model, args.task, adapter=args.adapter)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    task, limit = get_task(args.task), context_length(model)

    def encode(path):  # as Influence.encode does, so the fingerprints match `influscope score`
        return task.encode(record_list(load_records(path)), tokenizer, limit, args.truncate)

    train, queries = encode(args.train), encode(args.queries)
    if args.recipe:
        fn, source = _load_function(args.recipe)
        made = callable_recipe(
            fn, model, args.task, train, queries, source, args.measure_batch_size
        )
    else:
        made = finetune_recipe(model, args.task, train, queries, config, args.measure_batch_size)
    return made, tokenizer


def _init_distributed() -> None:
    """Join the ``torchrun`` process group when there is one (gloo on CPU, NCCL on CUDA)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _build(args: argparse.Namespace) -> int:
    from influscope.engine.distributed import is_writer
    from influscope.evaluation.bank import BankConfig, build_bank, drop_count

    config = BankConfig(
        fractions=tuple(args.fractions),
        subsets=args.subsets,
        seed=args.seed,
        tolerance=args.tolerance,
    )
    made, tokenizer = _setup(args)
    for k in config.fractions:  # refuse a bad fraction before the first fine-tune
        drop_count(k, made.n_train)
    model_dir = Path(args.bank) / "model"

    def save(model) -> None:
        if is_writer():
            model.save_pretrained(model_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(model_dir)

    bank = build_bank(
        made.recipe,
        made.measure,
        made.n_train,
        made.fingerprints,
        config,
        args.bank,
        args.name,
        args.overwrite,
        keep_full=None if args.no_save_model else save,
    )
    t = Table(title=f"validation bank {args.bank} ({made.n_train} rows, {bank.n_queries} queries)")
    for col in ("fraction", "rows dropped", "subsets", "mean |Δf|"):
        t.add_column(col)
    for f, k in enumerate(config.fractions):
        dropped, measured = bank.of_fraction(f)
        delta = (measured - bank.full).abs().mean()
        t.add_row(f"{k:g}", str(int(dropped[0].sum())), str(dropped.shape[0]), f"{delta:.4g}")
    Console().print(t)
    if not args.no_save_model:
        console.print(f"full-run model: {model_dir} (fit and score this model to validate)")
    return 0


def _score(args: argparse.Namespace) -> int:
    from influscope.analysis.runs import load_scores
    from influscope.engine.distributed import is_writer
    from influscope.errors import StaleArtifactError
    from influscope.evaluation.bank import load_bank
    from influscope.evaluation.bank_report import summary_lines
    from influscope.evaluation.bank_score import ScoreBankConfig, score_bank

    _require(args, "run", why="validate score")
    config = ScoreBankConfig(
        top_k=tuple(args.top_k or ()), removal_queries=args.removal_queries, seed=args.seed
    )
    bank = load_bank(args.bank, args.name)
    scores, meta = load_scores(args.run, args.scores)
    recipe = measure = None
    if config.top_k:
        made, _ = _setup(args)
        diffs = [k for k in made.fingerprints if made.fingerprints[k] != bank.fingerprints[k]]
        if diffs:
            raise StaleArtifactError(
                f"The removal test retrains with the bank's recipe, but these options give "
                f"another {', '.join(diffs)} than the bank was built with. Pass the same "
                "--model, --train, --queries and recipe options as `validate build`."
            )
        recipe, measure = made.recipe, made.measure
    result = score_bank(
        bank, scores, meta, config, recipe, measure, args.bank, name=f"{args.run}:{args.scores}"
    )
    Console().print(result_table(result))
    for line in summary_lines(result)[len(result.lds) :]:
        Console().print(line)
    out = Path(args.out or Path(args.run) / "validation" / f"{args.scores}.json")
    if is_writer():
        result.save(out)
        console.print(f"wrote {out}")
    return 0


def result_table(result) -> Table:
    """LDS per drop fraction as a rich table."""
    t = Table(title=f"LDS of {result.scores}")
    cols = ("leave-k-out", "rows dropped", "subsets", "LDS mean ± s.e.m.", "bootstrap s.e.")
    for col in (*cols, "queries"):
        t.add_column(col)
    for r in result.lds:
        note = f" ({r.constant_queries} constant)" if r.constant_queries else ""
        t.add_row(
            f"{r.fraction:g}",
            str(r.n_dropped),
            str(r.subsets),
            f"{r.mean:.3f} ± {r.sem:.3f}",
            f"{r.subset_se:.3f}",
            f"{r.n}{note}",
        )
    return t


def run(args: argparse.Namespace) -> int:
    """Run ``influscope validate build`` or ``validate score``."""
    _init_distributed()
    return _build(args) if args.action == "build" else _score(args)
