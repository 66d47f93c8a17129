"""``influscope probe KIND``: generalisation probes beside influence (see docs/probes.md).

::

    influscope probe representation --model runs/demo/model --data facts.jsonl --properties relation
    influscope probe length --model M --data lengths.jsonl --train-length 8 [--influence --train T]
    influscope probe prompting --model M --queries q.jsonl --demos d.jsonl --ks 0 1 2 4 8 \\
        --cot-prefix "Let us think step by step."
    influscope probe id-ood --model M --train train.jsonl --domain-key domain \\
        --eval shakespeare=held_out.jsonl --eval tweets=tweets.jsonl --influence

Every kind prints a table, writes the result as JSON (``--out``) and, with ``--svg``, its plot.
``--influence`` fits EK-FAC on ``--train`` and adds the influence columns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from influscope.cli.options import add_device_option, add_model_argument, check_writable
from influscope.errors import DataError

NAME = "probe"
HELP = "Generalisation probes (ID/OOD, length, prompting, representation) beside influence."


def _common(p: argparse.ArgumentParser, *, train_required: bool = False) -> None:
    add_model_argument(p)
    add_device_option(p)
    p.add_argument("--out", default=None, help="Write the result as JSON to this file.")
    p.add_argument("--svg", default=None, help="Write the probe's plot to this SVG file.")
    p.add_argument(
        "--run",
        default=None,
        help="Also store the result as RUN/probes/KIND.json; `influscope report RUN` then "
        "shows it as a section of the studies report.",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="Records per forward pass (default 16)."
    )
    if train_required:
        p.add_argument(
            "--train",
            required=True,
            help="Training records (.jsonl/.json/.txt/HF dataset dir), each with its domain.",
        )
    else:
        p.add_argument(
            "--train",
            default=None,
            help="Training records the model was trained on; needed by --influence.",
        )
    p.add_argument(
        "--influence",
        action="store_true",
        help="Fit EK-FAC on --train and show what influence says about the same examples.",
    )
    p.add_argument(
        "--relatif",
        action="store_true",
        help="With --influence: rank proponents by I / sqrt(self-influence) (RelatIF).",
    )


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``probe`` with its four kinds on ``sub`` (an argparse sub-parsers object)."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        description="Generalisation probes beside influence: representation (linear probes "
        "of a record property per layer), length (accuracy and loss against input length), "
        "prompting (zero-shot vs k-shot) and id-ood (loss and influence provenance per "
        "evaluation set). Every kind prints a table, writes JSON (--out) and optionally its "
        "plot (--svg); --influence adds influence columns from EK-FAC fitted on --train. See "
        "`influscope probe KIND --help`.",
    )
    kinds = p.add_subparsers(
        dest="kind", required=True, help="Which probe to run (see `influscope probe KIND --help`)."
    )

    rep = kinds.add_parser(
        "representation",
        help="Per-layer linear probes of a record property (scikit-learn).",
        description="Per-layer linear-probe accuracy (scikit-learn LogisticRegression, "
        "stratified k-fold) for every property named by --properties, with chance and a "
        "permuted-label control: where in the model a property becomes linearly readable. "
        "With --influence and --queries, the share of the queries' influence that passes "
        "through each block's tracked layers.",
    )
    _common(rep)
    rep.add_argument("--data", required=True, help="Records with the text and the properties.")
    rep.add_argument(
        "--properties", nargs="+", required=True, help="Record keys holding the labels to probe."
    )
    rep.add_argument("--text-key", default="text", help="Record key of the text (default text).")
    rep.add_argument(
        "--pool", choices=["mean", "last"], default="mean", help="Pool token states by mean/last."
    )
    rep.add_argument("--folds", type=int, default=5, help="Cross-validation folds (default 5).")
    rep.add_argument(
        "--queries",
        default=None,
        help="Prompt/completion queries whose layer-wise influence share is shown per block "
        "(with --influence).",
    )

    length = kinds.add_parser(
        "length",
        help="Accuracy and loss against input length.",
        description="Exact-match accuracy and loss per token of the completions against "
        "input length (--length-key), for a model trained up to length L (--train-length): "
        "how it extrapolates to longer inputs. With --influence, per length, whether the "
        "top-1 proponent is the fact's own training sequence, or the mean length of the "
        "top-k proponents.",
    )
    _common(length)
    length.add_argument(
        "--data", required=True, help="Prompt/completion records, each with an integer length."
    )
    length.add_argument(
        "--train-length", type=int, required=True, help="L: the longest length trained on."
    )
    length.add_argument("--length-key", default="length", help="Record key of the length.")
    length.add_argument("--top-k", type=int, default=10, help="k of the influence columns.")

    prompt = kinds.add_parser(
        "prompting",
        help="Zero-shot vs k-shot, with/without a prefix.",
        description="Accuracy (every completion token greedy), first-token accuracy and "
        "mean log p of the queries with k demonstrations from --demos (--ks), with and "
        "without a chain-of-thought style prefix (--cot-prefix). With --influence, per k, "
        "whether the top-1 proponent of the k-shot prompt is still the fact's own training "
        "sequence.",
    )
    _common(prompt)
    prompt.add_argument("--queries", required=True, help="Prompt/completion queries.")
    prompt.add_argument("--demos", required=True, help="Pool of prompt/completion demonstrations.")
    prompt.add_argument(
        "--ks", type=int, nargs="+", default=[0, 1, 2, 4, 8], help="Numbers of demonstrations."
    )
    prompt.add_argument(
        "--cot-prefix", default=None, help="Chain-of-thought style lead-in before the query."
    )
    prompt.add_argument(
        "--separator", default="\n", help="Text between demonstrations (default: a newline, \\n)."
    )
    prompt.add_argument(
        "--exclude-key",
        default="fact_id",
        help="Never use a demonstration sharing the query's value of this key.",
    )
    prompt.add_argument(
        "--group-key",
        default="relation",
        help="Prefer demonstrations with the query's value of this key.",
    )
    prompt.add_argument("--seed", type=int, default=0, help="Seed of the demonstration order.")

    ood = kinds.add_parser(
        "id-ood",
        help="Per-set loss, shift, and influence provenance.",
        description="Per evaluation set (--eval NAME=FILE): loss, accuracy and distribution "
        "shift (domain-classifier AUC on the last hidden state, distance to the nearest "
        "training-domain centroid). With --influence, for each example, whether its top "
        "proponents come from its nearest training domain (--domain-key), against that "
        "domain's share of the training set.",
    )
    _common(ood, train_required=True)
    ood.add_argument(
        "--eval",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="An evaluation set (repeat the option for several).",
    )
    ood.add_argument("--domain-key", default="domain", help="Training-record key of the domain.")
    ood.add_argument("--top-k", type=int, default=10, help="Proponents per example.")
    p.set_defaults(func=run)
    return p


def _load(args):
    from influscope.analyzer import resolve_device
    from influscope.loading import load_model

    model, tok = load_model(args.model)
    args.device = str(resolve_device(args.device))
    return model.to(args.device), tok


def _data_paths(args) -> list[str]:
    """Every data file the probe will read (validated before the model is loaded)."""
    names = ("data", "queries", "demos", "train")
    paths = [getattr(args, n) for n in names if getattr(args, n, None)]
    return paths + [path for _, path in _eval_sets(args)]


def _eval_sets(args) -> list[tuple[str, str]]:
    """``--eval NAME=FILE`` as ``(name, path)`` pairs."""
    pairs = []
    for item in getattr(args, "eval", None) or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DataError(f"--eval expects NAME=FILE, received {item!r}.")
        pairs.append((name, path))
    return pairs


def _reader():
    """``read(path)``: :func:`load_records`, each file parsed once (a fresh copy per call)."""
    import copy
    import functools

    from influscope.loading import load_records

    cached = functools.cache(load_records)
    return lambda path: copy.deepcopy(cached(path))


def _influence(args, model, tok, read):
    if not args.influence:
        return None
    if not args.train:
        raise DataError(
            "--influence needs the training records: pass --train FILE (what the model was "
            "trained on)."
        )
    from influscope.probes.base import InfluenceSide

    normalize = "relatif" if args.relatif else None
    return InfluenceSide(model, tok, read(args.train), device=args.device, normalize=normalize)


def run(args: argparse.Namespace) -> int:
    """Run ``influscope probe KIND``."""
    from rich.console import Console

    from influscope.probes import (
        IdOodConfig,
        PromptingConfig,
        RepresentationConfig,
        block_influence_share,
        id_ood_probe,
        length_probe,
        prompting_probe,
        representation_probe,
    )
    from influscope.probes.base import report_section
    from influscope.storage import atomic_write_json
    from influscope.storage.atomic import atomic_write_text

    read = _reader()
    for path in _data_paths(args):  # data files and output directories before the model
        read(path)
    outputs = [Path(p).parent for p in (args.out, args.svg) if p]
    for directory in outputs + ([Path(args.run) / "probes"] if args.run else []):
        check_writable(directory, "output directory")
    model, tok = _load(args)
    side = _influence(args, model, tok, read)
    if args.kind == "representation":
        share = None
        if side is not None and args.queries:
            from influscope.analysis.layers import layer_study

            scores = side.scores(read(args.queries), per_layer=True)
            study = layer_study(scores)
            share = block_influence_share(study.layer_names, study.abs_share)
        result = representation_probe(
            model,
            tok,
            read(args.data),
            args.properties,
            RepresentationConfig(pool=args.pool, folds=args.folds),
            text_key=args.text_key,
            influence_share=share,
        )
    elif args.kind == "length":
        result = length_probe(
            model,
            tok,
            read(args.data),
            args.train_length,
            length_key=args.length_key,
            influence=side,
            top_k=args.top_k,
            batch_size=args.batch_size,
        )
    elif args.kind == "prompting":
        config = PromptingConfig(
            ks=tuple(args.ks),
            separator=args.separator,
            cot_prefix=args.cot_prefix,
            exclude_key=args.exclude_key or None,
            group_key=args.group_key or None,
            seed=args.seed,
        )
        result = prompting_probe(
            model,
            tok,
            read(args.queries),
            read(args.demos),
            config,
            influence=side,
            batch_size=args.batch_size,
        )
    else:
        sets = {name: read(path) for name, path in _eval_sets(args)}
        result = id_ood_probe(
            model,
            tok,
            read(args.train),
            sets,
            IdOodConfig(domain_key=args.domain_key, top_k=args.top_k),
            influence=side,
            batch_size=args.batch_size,
        )
    Console().print(result.markdown(), markup=False, highlight=False)
    payload = {**result.to_dict(), "report_section": report_section(result)}
    if args.out:
        atomic_write_json(Path(args.out), payload)
    if args.run:
        atomic_write_json(Path(args.run) / "probes" / f"{args.kind}.json", payload)
    if args.svg:
        atomic_write_text(Path(args.svg), result.svg(title=f"influscope probe {args.kind}"))
    return 0
