"""The command line's structure: one module per command in ``COMMANDS``, choices from registries."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import influscope.cli as cli
from influscope.applications.reward_bias import MEASUREMENTS
from influscope.applications.reward_data import SELECTORS
from influscope.applications.unlearn import METHODS as UNLEARN_METHODS
from influscope.cli import COMMANDS, build_parser, main
from influscope.cli.options import shows_default
from influscope.config import FitConfig, ScoreConfig
from influscope.corrections.dda import CORRECTIONS, SMOOTHINGS
from influscope.curvature import CURVATURES
from influscope.errors import ConfigError
from influscope.index.ann import FAISS_BACKENDS, MIPS
from influscope.index.config import INDEX_DTYPES, IndexConfig
from influscope.index.config import OPTIMIZERS as INDEX_OPTIMIZERS
from influscope.metagrad.recipe import OPTIMIZERS, SCHEDULES
from influscope.probes import PROBES
from influscope.projection.projector import INITS
from influscope.solvers.refine import METHODS as REFINE_METHODS
from influscope.tasks import TASKS
from influscope.tasks.chat import CHAT_LOSSES

#: Files of the ``cli`` package that are not commands.
NOT_COMMANDS = {"__init__", "__main__", "options"}

#: (command, option dest) → the registry its choices are read from, for the options that are
#: not ``--curvature`` / ``--task`` (those are checked on every command that has them).
REGISTRIES = {
    ("score", "refine_method"): REFINE_METHODS,
    ("index", "init"): INITS,
    ("index", "dtype"): INDEX_DTYPES,
    ("index", "optimizer"): INDEX_OPTIMIZERS,
    ("ann", "backend"): FAISS_BACKENDS,
    ("ann", "mips"): MIPS,
    ("dda", "variants"): CORRECTIONS,
    ("dda", "smoothing"): SMOOTHINGS,
    ("bias", "measurement"): MEASUREMENTS,
    ("bias", "select"): SELECTORS,
    ("unlearn", "method"): UNLEARN_METHODS,
    ("magic", "optimizer"): OPTIMIZERS,
    ("magic", "schedule"): SCHEDULES,
    ("validate", "optimizer"): OPTIMIZERS,
    ("validate", "schedule"): SCHEDULES,
    **{(c, "chat_loss"): CHAT_LOSSES for c in ("fit", "score", "index", "query", "dda", "damping")},
}


def _fit_fisher(value):
    return FitConfig(fisher=value)


def _index_curvature(value):
    return IndexConfig(curvature=value)


def _index_fisher(value):
    return IndexConfig(fisher=value)


def _score_svd(value):
    return ScoreConfig(query_svd=value)


def _score_refine_start(value):
    return ScoreConfig(refine_start=value)


def _pool(value):
    from influscope.probes import RepresentationConfig

    return RepresentationConfig(pool=value)


#: Choices with no registry to read: the settings class that validates them accepts each one
#: (and, for the projected curvature, refuses every other registered curvature).
VALIDATED = {
    ("fit", "fisher"): _fit_fisher,
    ("index", "curvature"): _index_curvature,
    ("index", "fisher"): _index_fisher,
    ("score", "svd"): _score_svd,
    ("score", "refine_start"): _score_refine_start,
    ("probe representation", "pool"): _pool,
}

#: Choices that select a code path of the command itself (nothing in the library to tie).
CLI_ONLY = {("trajectory", "method"), ("validate", "action")}


def _walk(prefix: str, parser: argparse.ArgumentParser):
    """``(command path, parser)`` for every (nested) sub-command under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                path = f"{prefix} {name}".strip()
                yield path, child
                yield from _walk(path, child)


def _choices() -> dict[tuple[str, str], list]:
    """(command path, dest) → choices, for every option with choices (sub-commands excluded)."""
    return {
        (path, action.dest): list(action.choices)
        for path, p in _walk("", build_parser())
        for action in p._actions
        if action.choices is not None and not isinstance(action, argparse._SubParsersAction)
    }


def test_commands_are_the_parser_sub_commands_in_help_order():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert [c.NAME for c in COMMANDS] == list(sub.choices)


def test_every_module_of_the_cli_package_is_a_listed_command():
    # a new command file that is not in COMMANDS would never be reachable
    files = {p.stem for p in Path(cli.__file__).parent.glob("*.py")} - NOT_COMMANDS
    assert files == {c.__name__.rsplit(".", 1)[1] for c in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.NAME)
def test_every_command_module_has_the_interface(command):
    assert command.__name__ == f"influscope.cli.{command.NAME}"  # file name = command name
    sub = argparse.ArgumentParser().add_subparsers()
    parser = command.add_parser(sub)
    assert isinstance(parser, argparse.ArgumentParser)
    assert sub.choices == {command.NAME: parser}
    assert parser.get_default("func") is command.run  # dispatch: set_defaults(func=run)
    assert list(inspect.signature(command.run).parameters) == ["args"]
    assert command.add_parser.__doc__ and command.run.__doc__ and command.__doc__


def test_main_dispatches_through_func_and_turns_library_errors_into_status_2(monkeypatch, capsys):
    monkeypatch.setattr(cli.demo, "run", lambda args: 7)
    assert main(["demo", "--out", "nowhere"]) == 7

    def refused(args):
        raise ConfigError("no such setting")

    monkeypatch.setattr(cli.report, "run", refused)
    assert main(["report", "some-run"]) == 2
    assert "error: no such setting" in capsys.readouterr().err


def test_curvature_and_task_choices_equal_the_registries():
    choices = _choices()
    curvature = [k for k in choices if k[1] == "curvature" and k not in VALIDATED]
    task = [k for k in choices if k[1] == "task"]
    assert {c for c, _ in curvature} == {"fit", "dda", "bias", "unlearn", "curate"}
    assert {c for c, _ in task} == {
        "fit",
        "score",
        "index",
        "query",
        "dda",
        "damping",
        "unlearn",
        "trajectory",
        "validate",
        "magic",
    }
    for key in curvature:
        assert choices[key] == list(CURVATURES), key
    for key in task:
        assert choices[key] == list(TASKS), key


def test_other_choices_equal_their_registries():
    choices = _choices()
    for key, registry in REGISTRIES.items():
        assert choices[key] == list(registry), key


def test_choices_without_a_registry_are_what_the_settings_accept():
    choices = _choices()
    for key, make in VALIDATED.items():
        for value in choices[key]:
            make(value)  # accepted
        with pytest.raises(ConfigError, match=r"(received|Invalid pool:) 'bogus'"):
            make("bogus")
    for name in set(CURVATURES) - set(choices["index", "curvature"]):
        with pytest.raises(ConfigError, match="curvature must be 'ekfac' or 'identity'"):
            _index_curvature(name)


def test_every_choice_is_tied_to_the_library():
    # a new option with a copied tuple of choices fails here until it is tied above
    untied = {
        key
        for key in _choices()
        if key[1] not in ("curvature", "task")
        and key not in REGISTRIES
        and key not in VALIDATED
        and key not in CLI_ONLY
    }
    assert not untied, f"choices not read from (or checked against) the library: {untied}"


def test_probe_kinds_are_the_probe_registry():
    kinds = {path.split()[1] for path, _ in _walk("", build_parser()) if path.startswith("probe ")}
    assert kinds == {name.replace("_", "-") for name in PROBES}


def test_every_nested_sub_command_prints_its_help(capsys):
    paths = [path for path, _ in _walk("", build_parser())]
    assert len(paths) == len(COMMANDS) + len(PROBES)  # the probe kinds are nested
    for path in paths:
        with pytest.raises(SystemExit, match=r"^0$"):  # argparse exits 0 after the help
            build_parser().parse_args([*path.split(), "--help"])
        assert f"usage: influscope {path}" in " ".join(capsys.readouterr().out.split()), path


def test_python_dash_m_influscope_help_lists_every_command():
    for module in ("influscope", "influscope.cli"):
        out = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        for command in COMMANDS:
            assert command.NAME in out.stdout, (module, command.NAME)


def _option_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """``action``'s help as ``--help`` prints it (defaults expanded, whitespace joined)."""
    return " ".join(parser._get_formatter()._format_action(action).split())


def test_every_option_with_a_default_shows_it_in_help():
    missing = []
    for path, parser in [("", build_parser()), *_walk("", build_parser())]:
        for action in parser._actions:
            if not action.option_strings or not shows_default(action):
                continue
            d = action.default
            shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
            text = _option_help(parser, action)
            escaped = shown.encode("unicode_escape").decode()  # '\n' is shown as \n
            if "default" not in text or (shown not in text and escaped not in text):
                missing.append(f"{path} {action.option_strings[-1]}: {text}")
    assert not missing, "options whose --help does not show their default:\n" + "\n".join(missing)


def test_defaults_that_say_nothing_are_not_shown():
    parser = dict(_walk("", build_parser()))["score"]
    by_dest = {a.dest: a for a in parser._actions}
    assert "(default: 32)" in _option_help(parser, by_dest["rank"])
    assert "(default: 0.0, run all steps)" in _option_help(parser, by_dest["refine_tol"])
    assert "default: None" not in _option_help(parser, by_dest["damping"])
    assert "default: False" not in _option_help(parser, by_dest["relatif"])  # a flag


def test_every_command_and_probe_kind_has_a_description_paragraph():
    short = {
        path: parser.description
        for path, parser in _walk("", build_parser())
        if not parser.description or len(parser.description.split()) < 12
    }
    assert not short, f"commands without a description paragraph (12+ words): {short}"


def test_version(capsys):
    from influscope.version import __version__

    with pytest.raises(SystemExit, match=r"^0$"):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"influscope {__version__}"


def test_help_and_version_do_not_import_torch():
    """``influscope --help`` / ``--version`` build only the command list: no torch, no
    transformers (several seconds on a loaded machine); a command builds its own parser."""
    code = (
        "import sys\n"
        "from influscope.cli import main\n"
        "for argv in (['--version'], ['--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
    assert "fit" in out.stdout and "Fit curvature factors" in out.stdout  # the listing


def test_a_command_parser_alone_equals_the_full_one():
    """Building one command's parser (what ``main`` does) gives the same options as the full
    parser, and an unknown command lists every command."""
    full = build_parser()
    sub_full = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    for command in COMMANDS:
        alone = build_parser(command.NAME)
        sub = next(a for a in alone._actions if isinstance(a, argparse._SubParsersAction))
        got = sorted(o for a in sub.choices[command.NAME]._actions for o in a.option_strings)
        want = sorted(o for a in sub_full.choices[command.NAME]._actions for o in a.option_strings)
        assert got == want, command.NAME
        assert (
            next(c.help for c in sub_full._choices_actions if c.dest == command.NAME)
            == command.HELP
        )
    with pytest.raises(SystemExit, match=r"^2$"):
        main(["no-such-command"])


def test_error_messages_are_printed_whole(monkeypatch, capsys):
    # rich would read "[text]" as markup and drop it, and wrap a long line at 80 columns
    message = 'bad.jsonl: line 3 reads {"text": "b", ⟨here⟩[text]} [bold]' + " x" * 80

    def refused(args):
        raise ConfigError(message)

    monkeypatch.setattr(cli.report, "run", refused)
    assert main(["report", "some-run"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
