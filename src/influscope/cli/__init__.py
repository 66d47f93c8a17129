"""The ``influscope`` command line: one module per sub-command, listed once in :data:`COMMANDS`.

Examples::

    influscope fit   --model runs/demo/model --train train.jsonl --run runs/x
    influscope score --model runs/demo/model --train train.jsonl --queries q.jsonl --run runs/x
    influscope demo  --out runs/demo
    influscope report runs/demo --out runs/demo/studies.html
    influscope unlearn runs/demo/model --train train.jsonl --forget 3,17 --out edited/

Every command module has the same interface: ``NAME`` (the sub-command), ``add_parser(sub)``
(registers its parser on the sub-parsers and binds ``set_defaults(func=run)``) and
``run(args) -> int`` (the exit status). Heavy imports (torch, transformers, the library's
stages) stay inside ``run``, so ``influscope --help`` stays quick. Options shared by several
commands are defined once in :mod:`influscope.cli.options`, with choices read from the live
registries. :func:`main` is the one place where a library error becomes a message and exit
status 2, and Ctrl-C exit status 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from influscope.cli import (
    ann,
    bias,
    curate,
    damping,
    dda,
    demo,
    fit,
    index,
    magic,
    probe,
    query,
    report,
    score,
    trajectory,
    unlearn,
    validate,
)
from influscope.cli.options import Parser
from influscope.errors import InfluscopeError
from influscope.version import __version__

__all__ = ["COMMANDS", "build_parser", "main"]

#: The sub-command modules, in the order ``influscope --help`` lists them.
COMMANDS = [
    fit,
    score,
    demo,
    report,
    index,
    ann,
    query,
    dda,
    damping,
    bias,
    unlearn,
    curate,
    trajectory,
    probe,
    validate,
    magic,
]

#: Commands that keep finished shards when interrupted (docs/scale.md): Ctrl-C says so.
RESUMABLE = (fit.NAME, index.NAME)

console = Console(stderr=True)


def build_parser(only: str | None = "*") -> argparse.ArgumentParser:
    """The ``influscope`` parser: one sub-parser per module of :data:`COMMANDS`.

    Args:
        only: Which commands get their full parser (options, defaults, choices): ``"*"``
            every one; a command's name just that one; ``None`` none. The others are listed
            with their one-line ``HELP`` only, so ``influscope --help``, ``--version`` and a
            command's own parse do not import what the other commands need (their option
            defaults and choices come from modules that load torch).
    """
    parser = Parser(
        prog="influscope",
        description="Which training sequences made this language model produce this output? "
        "Influence functions with EK-FAC curvature. Positive influence = "
        "up-weighting the training sequence raises log p(completion | prompt).",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"influscope {__version__}",
        help="Print the version.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        if only == "*" or only == command.NAME:
            command.add_parser(sub)
        else:
            sub.add_parser(command.NAME, help=command.HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``influscope`` command: parse, run the command, report errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    word = next((a for a in argv if not a.startswith("-")), None)
    known = {command.NAME for command in COMMANDS}
    # a known command: only its parser is built; otherwise the list of commands (for --help,
    # --version, or argparse's "invalid choice" message)
    args = build_parser(word if word in known else None).parse_args(argv)
    try:
        return args.func(args)
    except InfluscopeError as exc:
        # the message verbatim: not read as markup (``[text]`` in a JSON excerpt would vanish)
        # and not wrapped at the terminal's width (paths and JSON stay whole for copying)
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if args.command in RESUMABLE:
            hint = (
                f" Finished shards are kept under {args.run}; rerun the same command to "
                "resume (with other data, model or options they are discarded)."
            )
        console.print(f"[yellow]interrupted.[/yellow]{hint}")
        return 130
