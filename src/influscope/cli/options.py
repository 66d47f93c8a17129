"""Command-line options shared by the ``influscope`` sub-commands, defined once.

The sub-commands that load a model, track modules or fit curvature (``fit``, ``score``,
``index``, ``query``, ``dda``, ``unlearn``, ``curate``, ``bias``) add those options through
these helpers, so that an option's name, default, choices and help text are written in one
place. A helper takes keyword overrides only where a command words an option for its own
context (``unlearn``'s ``--curvature`` is the curvature "of the step") or where the command's
option really differs (``curate`` tracks one module pattern, ``bias`` picks its modules
automatically).

Example::

    p = sub.add_parser("mine")
    add_model_argument(p, positional=True)
    add_model_options(p)  # --task --modules --truncate --device
    add_curvature_option(p, help="Curvature of my thing (default: ekfac).")
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
from collections.abc import Iterator, Sequence

from influscope.errors import ConfigError

__all__ = [
    "CURVATURES",
    "DEFAULT_MODULES",
    "TASKS",
    "HelpFormatter",
    "LazyChoices",
    "Parser",
    "add_batch_size_option",
    "add_curvature_option",
    "add_damping_options",
    "add_device_option",
    "add_model_argument",
    "add_model_options",
    "add_modules_option",
    "add_recipe_options",
    "add_run_options",
    "add_task_option",
    "add_truncate_option",
    "apply_contrast",
    "check_writable",
    "damping_kwargs",
    "data_file",
    "encode_records",
    "load_influence",
    "non_negative_int",
    "recipe_from_args",
    "recipe_parameters",
    "resolve_modules",
    "shows_default",
    "task_from_args",
]


class LazyChoices(Sequence):
    """An option's choices read from a registry or constant when argparse needs them.

    The registries live in modules that import torch (and transformers), several seconds
    that ``influscope --help`` and ``--version`` should not pay. argparse only iterates the
    choices to check a value or to print them, so the module is imported then, and the
    registry stays the one source of the names.

    Example:
        >>> "ekfac" in LazyChoices("influscope.curvature.registry", "CURVATURES")
        True
    """

    def __init__(self, module: str, attr: str) -> None:
        self.module, self.attr = module, attr

    def _resolve(self) -> tuple:
        # read each time, not cached: a curvature or task registered at run time is offered
        return tuple(getattr(importlib.import_module(self.module), self.attr))

    def __getitem__(self, index):
        return self._resolve()[index]

    def __len__(self) -> int:
        return len(self._resolve())

    def __contains__(self, value) -> bool:
        return value in self._resolve()

    def __iter__(self):
        return iter(self._resolve())

    def __repr__(self) -> str:
        return repr(list(self._resolve()))


#: Values of ``--task``: how a batch becomes a loss and a measurement (the task registry).
TASKS: Sequence[str] = LazyChoices("influscope.tasks", "TASKS")
#: Values of ``--curvature`` (the curvature registry, in its order: cheapest first).
CURVATURES: Sequence[str] = LazyChoices("influscope.curvature.registry", "CURVATURES")
#: Values of ``--chat-loss`` (:data:`influscope.tasks.chat.CHAT_LOSSES`).
CHAT_LOSSES: Sequence[str] = LazyChoices("influscope.tasks.chat", "CHAT_LOSSES")
#: Default of ``--modules``: the MLP preset.
DEFAULT_MODULES: tuple[str, ...] = ("mlp",)

MODEL_HELP = "Local Hugging Face model directory, or a .gguf file."
ADAPTER_HELP = (
    "PEFT (LoRA) adapter directory to apply on top of --model; influence is then taken "
    "through the adapter weights unless --modules says otherwise."
)
TASK_HELP = "How a batch becomes a loss and a measurement (default: causal_lm)."
MODULES_HELP = (
    "Modules to track: a preset ('mlp', 'attn', 'all', 'lora', 'trainable') or regexes / "
    "names (default: 'lora' for a model with LoRA adapters, else 'mlp'; on an MoE model "
    "'mlp' tracks every expert and the router)."
)
CURVATURE_HELP = "Curvature approximation (default: ekfac)."
TRUNCATE_HELP = (
    "Cut sequences longer than the model's context instead of failing (texts lose their end, "
    "prompts their start: completions are kept)."
)
CHAT_LOSS_HELP = (
    "Tokens of chat ('messages') records that are trained on and measured: 'assistant' "
    "(the assistant turns and their end-of-turn tokens) or 'all' (default: assistant)."
)
DEVICE_HELP = "torch device (default: cuda if available)."
BATCH_SIZE_HELP = "Sequences per forward/backward pass (default: 8)."


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` that shows every option's default.

    An option whose help text does not already say its default (``default``) gets
    ``(default: VALUE)`` appended, unless its default is ``None`` or ``False`` (an absent value
    or an off flag, which the help text explains). A list default is shown space-separated,
    as it is typed.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if action.option_strings and shows_default(action) and "default" not in text.lower():
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            shown = str(shown).replace("%", "%%").encode("unicode_escape").decode()
            end = "." if text.endswith(".") else ""
            text = f"{text.removesuffix('.')} (default: {shown}){end}"
        return text


def shows_default(action: argparse.Action) -> bool:
    """Whether ``--help`` must state ``action``'s default: anything but ``None`` (no value),
    ``False`` (a flag that is off) and suppressed ones (``0`` is shown)."""
    default = action.default
    return not (default is None or default is False or default is argparse.SUPPRESS)


class Parser(argparse.ArgumentParser):
    """The ``influscope`` parsers: :class:`HelpFormatter` by default, for every sub-command
    (``add_subparsers`` makes its parsers of the parent's class, so nested kinds inherit it)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def non_negative_int(text: str) -> int:
    """``argparse`` type of counts such as ``--top-k``: an integer ≥ 0.

    Raises:
        argparse.ArgumentTypeError: For anything else (argparse prints it with the usage and
            exits with status 2).
    """
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, received {text!r}")
    return value


def add_model_argument(
    parser: argparse.ArgumentParser, *, positional: bool = False, adapter: bool = False
) -> None:
    """Add the model to analyse: ``--model DIR`` (required) or a positional ``model``.

    Args:
        parser: The sub-command's parser.
        positional: Take the model as the first positional argument (``unlearn``, ``curate``)
            instead of the required ``--model`` option.
        adapter: Also add ``--adapter DIR`` (a PEFT adapter applied on top of the model).
    """
    if positional:
        parser.add_argument("model", help=MODEL_HELP)
    else:
        parser.add_argument("--model", required=True, help=MODEL_HELP)
    if adapter:
        parser.add_argument("--adapter", default=None, help=ADAPTER_HELP)


def add_task_option(parser: argparse.ArgumentParser, *, help: str = TASK_HELP) -> None:
    """Add ``--task`` (one of :data:`TASKS`, default ``causal_lm``).

    Args:
        parser: The sub-command's parser.
        help: Help text, when the command uses only part of the task (e.g. only its loss).
    """
    parser.add_argument("--task", default="causal_lm", choices=TASKS, help=help)


def add_modules_option(
    parser: argparse.ArgumentParser,
    *,
    default: Sequence[str] | str | None = DEFAULT_MODULES,
    nargs: str | None = "+",
    help: str = MODULES_HELP,
) -> None:
    """Add ``--modules``: the tracked modules, as presets, regexes or module names.

    Args:
        parser: The sub-command's parser.
        default: Value when the option is absent; a tuple is stored as a fresh list (what
            ``nargs="+"`` produces), ``None`` lets the command choose.
        nargs: ``"+"`` for one or more values, ``None`` for exactly one.
        help: Help text, when the default or ``nargs`` differ from the shared ones.
    """
    if isinstance(default, tuple):
        default = list(default)
    parser.add_argument("--modules", default=default, nargs=nargs, help=help)


def add_curvature_option(parser: argparse.ArgumentParser, *, help: str = CURVATURE_HELP) -> None:
    """Add ``--curvature`` (one of :data:`CURVATURES`, default ``ekfac``).

    Args:
        parser: The sub-command's parser.
        help: Help text saying what the curvature is used for in this command.
    """
    parser.add_argument("--curvature", default="ekfac", choices=CURVATURES, help=help)


def add_truncate_option(parser: argparse.ArgumentParser) -> None:
    """Add the ``--truncate`` flag (cut over-long sequences rather than fail).

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument("--truncate", action="store_true", help=TRUNCATE_HELP)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (a torch device string; ``None`` picks CUDA when available).

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def add_batch_size_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--batch-size`` (sequences per forward/backward pass, default 8).

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument("--batch-size", type=int, default=8, help=BATCH_SIZE_HELP)


def add_memory_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--memory-gb`` (the stage's memory budget, :mod:`influscope.budget`).

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="Memory budget in GiB: the most this process may hold at its peak (resident set "
        "size on CPU, allocated memory on CUDA). It sizes the replay cache and, if needed, "
        "the batch; a budget below what one layer needs is refused before any work "
        "(default: held now + 90%% of the device's free memory).",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--task``, ``--modules``, ``--truncate`` and ``--device``, in that order.

    These are how every run-directory command (``fit``, ``score``, ``index``, ``query``,
    ``dda``) loads and instruments the model. ``--modules`` defaults to ``None``: the command
    picks :func:`influscope.modules.default_modules` once the model is loaded.

    Args:
        parser: The sub-command's parser.
    """
    add_task_option(parser)
    add_modules_option(parser, default=None)
    add_truncate_option(parser)
    add_device_option(parser)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of every run-directory command: model, data, run, how the model loads.

    ``--model`` (required), ``--adapter``, ``--train`` (required), ``--run`` (required), then
    :func:`add_model_options` (``--task --modules --truncate --device``), ``--chat-loss`` and
    ``--overwrite``.
    Used by ``fit``, ``score``, ``index``, ``query``, ``dda`` and ``damping``, whose arguments
    :func:`load_influence` then reads.

    Args:
        parser: The sub-command's parser.
    """
    add_model_argument(parser, adapter=True)
    parser.add_argument(
        "--train",
        required=True,
        help="Training records: .jsonl/.json with 'text' (or 'prompt'+'completion', or chat "
        "'messages'), a .txt file (one record per paragraph), or a saved HF dataset dir.",
    )
    parser.add_argument("--run", required=True, help="Run directory where stages are stored.")
    add_model_options(parser)  # --task --modules --truncate --device
    parser.add_argument(
        "--chat-loss", default="assistant", choices=CHAT_LOSSES, help=CHAT_LOSS_HELP
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Recompute a stored stage even if it exists (else it is reused when it "
        "matches, refused when model/data/config differ).",
    )


def add_recipe_options(parser, *, old_names: bool = False) -> None:
    """Add the deterministic fine-tune's options (:class:`~influscope.metagrad.FinetuneConfig`).

    ``--epochs --lr --train-batch-size --train-seed --optimizer --weight-decay --momentum
    --schedule --parameters``, each defaulting to the library's default, read back by
    :func:`recipe_from_args`. Used by ``magic`` and ``validate``, so both commands spell and
    default the recipe the same way. The ``train-`` prefix keeps the recipe's batch size and
    seed apart from a command's own (``validate --seed`` draws the subsets, ``validate
    --measure-batch-size`` batches the queries).

    Args:
        parser: The sub-command's parser (or an argument group of it).
        old_names: Also accept ``--batch-size`` and ``--seed`` for ``--train-batch-size`` and
            ``--train-seed``, hidden from ``--help`` (``magic``'s spellings before they were
            shared; commands written with them keep working).
    """
    from influscope.metagrad.recipe import OPTIMIZERS, SCHEDULES, FinetuneConfig

    d = FinetuneConfig()
    parser.add_argument("--epochs", type=int, default=d.epochs, help="Fine-tune epochs.")
    parser.add_argument("--lr", type=float, default=d.lr, help="Peak learning rate.")
    parser.add_argument(
        "--train-batch-size",
        type=int,
        default=d.batch_size,
        help="Training examples per optimizer step of the fine-tune.",
    )
    parser.add_argument(
        "--train-seed",
        type=int,
        default=d.seed,
        help="Seed of the fine-tune's per-epoch data order (its only randomness).",
    )
    if old_names:  # hidden aliases; SUPPRESS leaves the default to the option above
        for old, dest in (("--batch-size", "train_batch_size"), ("--seed", "train_seed")):
            parser.add_argument(
                old, dest=dest, type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
    parser.add_argument(
        "--optimizer",
        default=d.optimizer,
        choices=list(OPTIMIZERS),
        help=f"adamw (betas {d.betas[0]:g}, {d.betas[1]:g}, eps {d.eps:g}) or sgd (see "
        "--momentum).",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW's decoupled weight decay, or SGD's L2 term.",
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=d.momentum,
        help="SGD's heavy-ball momentum (0: plain SGD; AdamW takes 0).",
    )
    parser.add_argument(
        "--schedule",
        default=d.schedule,
        choices=list(SCHEDULES),
        help="Learning-rate schedule: constant, or linear decay lr·(1 - t/T).",
    )
    parser.add_argument(
        "--parameters",
        default=None,
        help="Parameters the fine-tune trains: trainable (those with requires_grad), all, "
        "lora (PEFT adapter matrices), or a regex searched in parameter names (default: lora "
        "with --adapter, else trainable).",
    )


def recipe_parameters(args: argparse.Namespace) -> str:
    """``--parameters``, or its default: the adapters of an ``--adapter`` model, else the
    trainable parameters (an adapter loaded for inference has ``requires_grad`` off)."""
    if args.parameters is not None:
        return args.parameters
    return "lora" if getattr(args, "adapter", None) else "trainable"


def recipe_from_args(args: argparse.Namespace):
    """The :class:`~influscope.metagrad.FinetuneConfig` of :func:`add_recipe_options`' options.

    Raises:
        ConfigError: A value the recipe refuses (e.g. ``--momentum`` with AdamW), before any
            model is loaded.
    """
    from influscope.metagrad.recipe import FinetuneConfig

    return FinetuneConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.train_batch_size,
        seed=args.train_seed,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        schedule=args.schedule,
        parameters=recipe_parameters(args),
    )


def resolve_modules(values: Sequence[str] | str | None, model=None) -> list[str] | str | None:
    """Turn the parsed ``--modules`` into the ``modules`` argument of :class:`Influence`.

    One value stays a string (so that a preset such as ``mlp`` is recognised as one), several
    stay a list. An absent or empty value is the model's default preset when ``model`` is
    given (``"lora"`` for a LoRA model, else ``"mlp"``), and ``None`` (the command's own
    automatic choice) when it is not.

    Args:
        values: ``args.modules``.
        model: The loaded model, to choose the default preset.

    Returns:
        The string, list or ``None`` to pass on.
    """
    if not values:
        if model is None:
            return None
        from influscope.modules.selection import default_modules

        return default_modules(model)
    if isinstance(values, str):
        return values
    return values[0] if len(values) == 1 else list(values)


def add_damping_options(parser: argparse.ArgumentParser, what: str = "the curvature") -> None:
    """``--damping`` (absolute λ) and ``--damping-factor`` (λ_ℓ = factor × mean eigenvalue)."""
    parser.add_argument(
        "--damping",
        type=float,
        default=None,
        help=f"Absolute damping λ for every layer of {what} (default: relative, see "
        "--damping-factor).",
    )
    parser.add_argument(
        "--damping-factor",
        type=float,
        default=None,
        help=f"Damping of {what} = factor × mean eigenvalue per layer (default 0.1).",
    )


def damping_kwargs(args: argparse.Namespace) -> dict:
    """The FitConfig keyword arguments for the damping options that were given.

    Raises:
        ConfigError: Both options given, or a negative / non-finite value.
    """
    from influscope.scoring.damping import check_damping

    damping = getattr(args, "damping", None)
    factor = getattr(args, "damping_factor", None)
    if damping is not None and factor is not None:
        raise ConfigError(
            f"Give --damping (absolute λ) or --damping-factor (relative), not both; received "
            f"--damping {damping} and --damping-factor {factor}."
        )
    if damping is not None:
        return {"damping": check_damping(damping, "--damping")}
    if factor is not None:
        return {"damping_factor": check_damping(factor, "--damping-factor")}
    return {}


def check_writable(path, what: str = "run directory"):
    """Create ``path`` (a directory) if needed and refuse it now unless a file can be written.

    Commands call it for their output directories before loading the model, so that a
    read-only ``--run`` or ``--out`` is refused in a second instead of after the forward passes.

    Raises:
        StorageError: The directory cannot be created or written.
    """
    from influscope.storage.run import check_writable as _check

    return _check(path, what)


@contextlib.contextmanager
def data_file(path) -> Iterator[None]:
    """Within the block, a :class:`DataError` (a bad record) is re-raised naming ``path``.

    The tasks number records from 1 (``record 3``) but do not know the file they were read
    from; this prefixes it, so that ``train.jsonl: record 3 has keys ['txt'] ...`` says where
    to look.
    """
    from influscope.errors import DataError

    try:
        yield
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None


def encode_records(inf, records: list[dict], path, truncate: bool = False):
    """``inf.encode(records, truncate)``, with the data file named in any :class:`DataError`."""
    with data_file(path):
        return inf.encode(records, truncate=truncate)


def load_influence(args: argparse.Namespace):
    """``(Influence, encoded training set)`` from the common model / data / run options.

    Used by every command that takes ``--model --train --run`` (``fit``, ``score``,
    ``damping``, ``index``, ``query``). The training file is read and the run directory
    proved writable before the model is loaded (seconds to minutes for a real LLM), so that
    an empty or malformed file or a read-only ``--run`` is refused first.
    """
    from influscope.analyzer import Influence
    from influscope.loading import load_model, load_records

    records = load_records(args.train)
    check_writable(args.run)
    model, tokenizer = load_model(args.model, args.task, adapter=args.adapter)
    modules = resolve_modules(args.modules, model)
    inf = Influence(
        model,
        task_from_args(args),
        modules=modules,
        run_dir=args.run,
        tokenizer=tokenizer,
        device=args.device,
    )
    train = encode_records(inf, records, args.train, args.truncate)
    return inf, train


def task_from_args(args: argparse.Namespace):
    """The task of ``--task``, with ``--chat-loss`` applied to a causal LM.

    Returns:
        A :class:`~influscope.tasks.CausalLMTask` built with ``chat_loss`` for ``causal_lm``,
        else the task's name.
    """
    if args.task == "causal_lm":
        from influscope.tasks import CausalLMTask

        return CausalLMTask(chat_loss=getattr(args, "chat_loss", "assistant"))
    return args.task


def apply_contrast(records: list[dict], contrast: str | None) -> list[dict]:
    """Query records with their ``contrast`` taken from ``--contrast``.

    ``--contrast`` names a column of the query records (its values become ``contrast``) or a
    file of contrasts aligned with the queries: ``.txt`` with one contrast per line (an empty
    line: that query has none), or ``.jsonl`` / ``.json`` records with a ``contrast`` (or
    ``completion``) field (``null``: none). Without ``--contrast``, a ``contrast`` column is
    used as is when present.

    Raises:
        DataError: A column that no record has, a file whose count differs from the queries,
            or a contrast file record with neither field.
    """
    from pathlib import Path

    from influscope.errors import DataError

    if contrast is None:
        return records
    path = Path(contrast)
    if path.is_file():
        if path.suffix.lower() == ".txt":  # one per line; an empty line: no contrast
            values = [line or None for line in path.read_text(encoding="utf-8-sig").splitlines()]
        else:
            from influscope.loading import load_records

            values = []
            for n, rec in enumerate(load_records(path)):
                key = "contrast" if "contrast" in rec else "completion"
                if key not in rec:
                    raise DataError(
                        f"{path} record {n} has keys {sorted(rec)}; expected a 'contrast' (or "
                        "'completion') field holding the answer to contrast with."
                    )
                values.append(rec[key])
        if len(values) != len(records):
            raise DataError(
                f"--contrast {path} holds {len(values)} contrasts for {len(records)} queries; "
                "give one per query, in the queries' order (one line each in a .txt file)."
            )
        return [r if v is None else {**r, "contrast": v} for r, v in zip(records, values)]
    have = [i for i, r in enumerate(records) if contrast in r]
    if not have:
        columns = sorted({k for r in records for k in r})
        raise DataError(
            f"--contrast {contrast!r} is neither a file nor a column of the queries (columns: "
            f"{columns}). Name the column holding each query's alternative answer, or a .txt "
            "file with one contrast per line."
        )
    return [
        {**{k: v for k, v in r.items() if k != contrast}, "contrast": r[contrast]}
        if contrast in r
        else r
        for r in records
    ]
