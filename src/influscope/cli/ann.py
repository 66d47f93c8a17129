"""``influscope ann``: build an approximate nearest-neighbour (FAISS) index over a stored
gradient index (``influscope index``), for ``influscope query --ann``.

Examples::

    influscope ann --run runs/x --backend faiss-ivf --nlist 4096 --nprobe 64
    influscope ann --run runs/x --backend faiss-ivfpq --m 64 --nbits 8 --name small
    influscope query ... --ann faiss-ivf --ann-k 1000 --top-k 10 [--rescore]

Needs ``faiss-cpu`` (``pip install 'influscope[ann]'``). docs/scale.md, "Approximate search".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from influscope.cli.options import LazyChoices

NAME = "ann"
HELP = "Build a FAISS index over a stored gradient index."

console = Console(stderr=True)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``ann`` on ``sub`` (the main parser's sub-parsers)."""
    ann = sub.add_parser(
        NAME,
        help=HELP,
        description="Build an approximate nearest-neighbour (FAISS) index over the rows of a "
        "stored gradient index (influscope index), so that `influscope query --ann` scans a "
        "few IVF lists instead of every row; its candidates are then re-ranked with the exact "
        "index scores. Flat (exact), IVF, PQ and IVF-PQ; needs faiss-cpu (the `ann` extra).",
    )
    ann.add_argument("--run", required=True, help="Run directory holding index/<name>/.")
    ann.add_argument(
        "--index", default="index", help="Name of the gradient index (default: index)."
    )
    ann.add_argument(
        "--backend",
        default="faiss-ivf",
        choices=LazyChoices("influscope.index.ann", "FAISS_BACKENDS"),
        help="faiss-flat (exact), faiss-ivf (default), faiss-pq, faiss-ivfpq.",
    )
    ann.add_argument(
        "--mips",
        default="augment",
        choices=LazyChoices("influscope.index.ann", "MIPS"),
        help="augment (default): inner product as Euclidean search on rows padded to equal "
        "norm; direct: FAISS inner-product metric (docs/scale.md).",
    )
    ann.add_argument("--name", default=None, help="File name under ann/ (default: the backend).")
    ann.add_argument(
        "--nlist", type=int, default=0, help="IVF lists (default 0: about 4·sqrt(rows))."
    )
    ann.add_argument(
        "--nprobe", type=int, default=32, help="IVF lists scanned per query (default 32)."
    )
    ann.add_argument(
        "--m", type=int, default=64, help="PQ sub-quantisers; must divide the row width (64)."
    )
    ann.add_argument("--nbits", type=int, default=8, help="Bits per PQ code (default 8).")
    ann.add_argument(
        "--train-rows", type=int, default=65_536, help="Rows sampled to train k-means/PQ (65536)."
    )
    ann.add_argument("--seed", type=int, default=0, help="Seed of the sample and k-means (0).")
    ann.add_argument(
        "--chunk", type=int, default=16_384, help="Rows read and added at a time (16384)."
    )
    ann.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an ANN index of that name built with other settings or for another index.",
    )
    ann.set_defaults(func=run)
    return ann


def run(args: argparse.Namespace) -> int:
    """Run ``influscope ann``."""
    from influscope.index import GradientIndex
    from influscope.index.ann import AnnConfig, build_ann

    config = AnnConfig(
        backend=args.backend,
        mips=args.mips,
        nlist=args.nlist,
        nprobe=args.nprobe,
        m=args.m,
        nbits=args.nbits,
        train_rows=args.train_rows,
        seed=args.seed,
        chunk=args.chunk,
    )
    index = GradientIndex(Path(args.run) / "index" / args.index)
    ann = build_ann(index, config, name=args.name, overwrite=args.overwrite)
    console.print(
        f"[green]ann[/green] {config.backend} over {index.n_rows} rows × {index.meta['dim']} "
        f"→ {index.root / 'ann' / (ann.name + '.faiss')}"
    )
    return 0
