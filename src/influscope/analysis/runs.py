"""Run every study a stored run supports and render the run as one HTML report.

This is what ``influscope report RUN`` calls. A run directory holds (see
:mod:`influscope.storage`)::

    RUN/scores/<name>/{tensors.safetensors, meta.json}   # required (influscope score / demo)
    RUN/factors/<name>/…                                 # needed for token-level colouring
    RUN/model/                                           # HF model + tokenizer (optional)
    RUN/model/corpus.json or RUN/data.json               # records (or pass --train/--queries)

What is shown depends on what is found: with a model and factors, every shown sequence gets
per-token influence (one extra pass over the shown sequences only); without them the text is
shown uncoloured. Studies run when their inputs exist:

=============  ============================================================
sparsity       always (positive scores of each query)
layers         scores stored with per-layer terms
overlap        training and query texts
languages      planted-fact records with queries in several languages
word order     planted-fact records with an ``order``
tokens         per-token influence (model and factors found)
=============  ============================================================

The study results are also written to ``RUN/studies.json``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from influscope.analysis.base import StudyResult
from influscope.analysis.components import expert_groups, expert_study, head_study
from influscope.analysis.languages import language_study
from influscope.analysis.layers import layer_heatmap, layer_study
from influscope.analysis.overlap import OverlapConfig, overlap_study
from influscope.analysis.sparsity import SparsityConfig, sparsity_study
from influscope.analysis.tokens import token_study
from influscope.analysis.word_order import word_order_study
from influscope.errors import ConfigError, DataError, InfluscopeError
from influscope.probes.base import stored_sections
from influscope.report.summary import describe_layers, record_meta
from influscope.report.views import QueryView, ReportView, SequenceView
from influscope.scoring.pairwise import Scores
from influscope.storage import atomic_write_json, read_json, read_tensors

__all__ = ["StudyConfig", "load_scores", "query_label", "report_run", "run_studies"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyConfig:
    """Settings of the studies run on a run directory.

    Attributes:
        sparsity: Power-law fit settings.
        overlap: Lexical-overlap settings.
        layer_top_k: Proponents used by the layer study.
        source_lang: Language the planted facts are stated in, for the language study.
        top_k: Proponents and opponents shown per query in the report.
    """

    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    layer_top_k: int = 10
    source_lang: str = "en"
    top_k: int = 5

    def __post_init__(self) -> None:
        if self.layer_top_k < 1 or self.top_k < 1:
            raise ConfigError(
                f"layer_top_k and top_k must be ≥ 1, received {self.layer_top_k}, {self.top_k}."
            )


def query_label(record: dict[str, Any], q: int) -> str:
    """A short label: ``"fact-0003 fr reversed"`` for planted facts, else ``"query q"``."""
    if record.get("fact_id") is None:
        return f"query {q}"
    parts = [str(record["fact_id"]), str(record.get("lang") or ""), str(record.get("order") or "")]
    return " ".join(p for p in parts if p)


def _text(record: dict[str, Any]) -> str:
    if "prompt" in record:
        return f"{record['prompt']}{record.get('completion', '')}"
    return str(record.get("text", ""))


def run_studies(
    scores: Scores,
    query_records: Sequence[dict[str, Any]],
    train_records: Sequence[dict[str, Any]],
    config: StudyConfig | None = None,
    views: Sequence[QueryView] = (),
) -> dict[str, StudyResult]:
    """Run each study whose inputs are present.

    Args:
        scores: Scores of the queries against the training records (``(Q, N)``).
        query_records: ``Q`` query records, in score-row order.
        train_records: ``N`` training records, in score-column order.
        config: Study settings.
        views: Report query views carrying per-token scores (for the token study).

    Returns:
        ``{study name: result}`` in report order.
    """
    config = config or StudyConfig()
    names = [query_label(r, q) for q, r in enumerate(query_records)]
    out: dict[str, StudyResult] = {"sparsity": sparsity_study(scores, config.sparsity, names)}
    if scores.per_layer is not None:
        out["layers"] = layer_study(scores, names, config.layer_top_k)
        if expert_groups(scores.layer_names):
            out["experts"] = expert_study(scores, names, config.layer_top_k)
    if scores.per_head is not None and scores.head_names:
        out["heads"] = head_study(scores, names, config.layer_top_k)
    train_texts = [_text(r) for r in train_records]
    if any(train_texts):
        out["overlap"] = overlap_study(
            scores, [_text(r) for r in query_records], train_texts, config.overlap, names
        )
    langs = {r.get("lang") for r in query_records if r.get("fact_id") is not None}
    if len(langs - {None}) > 1:
        try:
            out["languages"] = language_study(
                scores, query_records, train_records, config.source_lang
            )
        except DataError as exc:
            logger.info("languages study skipped: %s", exc)
    if any(r.get("order") for r in query_records if r.get("fact_id") is not None):
        try:
            out["word_order"] = word_order_study(scores, query_records, train_records)
        except DataError as exc:
            logger.info("word-order study skipped: %s", exc)
    if any(s.token_scores for v in views for s in (*v.proponents, *v.opponents)):
        out["tokens"] = token_study(views)
    return out


def load_scores(run: str | Path, name: str = "scores") -> tuple[Scores, dict[str, Any]]:
    """Read a stored scores stage without recomputing anything.

    Raises:
        DataError: If ``RUN/scores/<name>`` is missing.
    """
    stage = Path(run) / "scores" / name
    if not (stage / "meta.json").is_file() or not (stage / "tensors.safetensors").is_file():
        raise DataError(
            f"No scores stage {name!r} under {run}. Run `influscope score --run {run}` (or "
            "`influscope demo`) first, or pass --scores NAME."
        )
    meta = read_json(stage / "meta.json")
    tensors = read_tensors(stage / "tensors.safetensors", "cpu")
    known = {"pairwise", "per_layer", "self_influence", "measurements", "per_head"}
    scores = Scores(
        layer_names=list(meta.get("layers", [])),
        head_names=meta.get("heads"),
        train_indices=list(meta.get("train_indices", range(tensors["pairwise"].shape[1]))),
        **{k: v for k, v in tensors.items() if k in known},
    )
    return scores, meta


def _records(
    run: Path, train: str | Path | None, queries: str | Path | None, n_queries: int
) -> tuple[list[dict], list[dict]]:
    from influscope.loading import load_records

    train_recs = load_records(train) if train else None
    query_recs = load_records(queries) if queries else None
    if train_recs is None or query_recs is None:
        data = run / "data.json"
        corpus = run / "model" / "corpus.json"
        if data.is_file():
            payload = read_json(data)
        elif corpus.is_file():
            payload = read_json(corpus)
            extra: list[dict] = []
            if len(payload["queries"]) < n_queries:  # the demo adds free-text queries
                extra = payload.get("free_text_queries", [])  # stored by DemoCorpus.save
            payload = {"records": payload["records"], "queries": payload["queries"] + extra}
        else:
            raise DataError(
                f"No records found for run {run}: expected {data} or {corpus}. Pass --train and "
                "--queries with the files that were scored."
            )
        train_recs = train_recs or payload["records"]
        query_recs = query_recs or payload["queries"]
    if len(query_recs) != n_queries:
        raise DataError(
            f"The scores have {n_queries} queries but {len(query_recs)} query records were "
            "found. Pass --queries with the file that was scored."
        )
    return train_recs, query_recs


def _plain_views(
    scores: Scores, query_records: list[dict], train_records: list[dict], top_k: int
) -> list[QueryView]:
    """Query views without per-token scores (no model available)."""

    def seq(q: int, pos: int, score: float) -> SequenceView:
        rec = train_records[pos]
        text = _text(rec)
        return SequenceView(
            scores.train_indices[pos], score, [text], [], record_meta(rec), text=text
        )

    views = []
    for q, rec in enumerate(query_records):
        views.append(
            QueryView(
                name=query_label(rec, q),
                prompt=str(rec.get("prompt", rec.get("text", ""))),
                completion=str(rec.get("completion", "")),
                proponents=[seq(q, i, s) for i, s in scores.top(q, top_k)],
                opponents=[seq(q, i, s) for i, s in scores.top(q, top_k, opponents=True)],
            )
        )
    return views


def _token_views(
    run: Path,
    model_path: Path,
    factors_name: str,
    scores: Scores,
    meta: dict[str, Any],
    train_recs: list[dict],
    query_recs: list[dict],
    top_k: int,
) -> tuple[list[QueryView], Any]:
    """Full views (token colouring) via the model and the stored factors."""
    from influscope.analyzer import Influence
    from influscope.config import ScoreConfig
    from influscope.loading import load_model
    from influscope.report.build import build_report

    model, tokenizer = load_model(model_path)
    layers = [f"^{re.escape(n)}$" for n in scores.layer_names]
    inf = Influence(model, "causal_lm", modules=layers, run_dir=run, tokenizer=tokenizer)
    train = inf.encode(train_recs, truncate=True)
    queries = inf.encode(query_recs, truncate=True)
    factors = inf.load_factors(train, factors_name)
    score_cfg = ScoreConfig.from_dict({**meta.get("config", {}), "per_layer": False})
    pq = inf.precondition(queries, factors, score_cfg)
    view = build_report(
        inf,
        queries,
        pq,
        train,
        factors,
        scores,
        title="",
        overview={},
        top_k=top_k,
    )
    named = [
        QueryView(
            name=query_label(query_recs[q], q),
            prompt=v.prompt,
            completion=v.completion,
            proponents=v.proponents,
            opponents=v.opponents,
            layer_scores=v.layer_scores,
            notes=v.notes,
        )
        for q, v in enumerate(view.queries)
    ]
    return named, view.layer_heatmap


def _loadable(path: Path) -> bool:
    """Whether ``path`` looks like a model :func:`influscope.loading.load_model` reads: a
    ``.gguf`` file or a Hugging Face directory (``config.json``)."""
    return (path.suffix == ".gguf" and path.is_file()) or (path / "config.json").is_file()


def report_run(
    run: str | Path,
    *,
    scores_name: str = "scores",
    factors_name: str = "factors",
    train: str | Path | None = None,
    queries: str | Path | None = None,
    model: str | Path | None = None,
    config: StudyConfig | None = None,
    title: str | None = None,
) -> tuple[ReportView, dict[str, StudyResult]]:
    """Build the report of a run: overview, query cards, and every supported study.

    Args:
        run: The run directory.
        scores_name: Name of the scores stage.
        factors_name: Name of the factors stage (for token-level colouring).
        train: Training records file (default: ``RUN/data.json`` or ``RUN/model/corpus.json``).
        queries: Query records file (same default).
        model: Model for token-level colouring, a Hugging Face directory or a ``.gguf``
            file as for every other command (default ``RUN/model`` when present; ``"none"``
            disables it). A model given here that cannot be loaded is an error.
        config: Study settings.
        title: Page title.

    Returns:
        ``(report view, study results)``.

    Raises:
        DataError: No scores stage, records that do not match it, or a ``model`` that is
            neither a model directory nor a ``.gguf`` file or that fails to load.
    """
    config = config or StudyConfig()
    run = Path(run)
    explicit = model is not None and str(model) != "none"
    model_path = Path(model) if explicit else run / "model"
    if explicit and not _loadable(model_path):
        raise DataError(
            f"--model {str(model)!r}: expected a Hugging Face model directory (one holding "
            "config.json) or a .gguf file, the same model given to `influscope fit` and "
            f"`score`; {'it does not exist' if not model_path.exists() else 'found neither'}. "
            "Pass that model, or --model none to show the text without token colouring."
        )
    scores, meta = load_scores(run, scores_name)
    n_q, n = scores.pairwise.shape
    train_all, query_recs = _records(run, train, queries, n_q)
    if max(scores.train_indices, default=-1) >= len(train_all):
        raise DataError(
            f"The scores index training record {max(scores.train_indices)} but only "
            f"{len(train_all)} records were found. Pass --train with the file that was scored."
        )
    train_recs = [train_all[i] for i in scores.train_indices]
    heatmap = None
    views: list[QueryView] = []
    token_note = "no model found: text shown without token colouring"
    if str(model) != "none" and _loadable(model_path) and n == len(train_all):
        try:
            views, heatmap = _token_views(
                run, model_path, factors_name, scores, meta, train_all, query_recs, config.top_k
            )
            token_note = f"per-token influence from {model_path}"
        except InfluscopeError as exc:
            if explicit:  # the model the user named must load, or the report says why not
                raise
            logger.warning("token colouring skipped: %s", exc)
            token_note = f"token colouring skipped: {exc}"
    if not views:
        views = _plain_views(scores, query_recs, train_recs, config.top_k)
        if scores.per_layer is not None:
            cols, values = [], []
            for q in range(n_q):
                _, c, v = layer_heatmap(scores, q, 1)
                cols.append(f"query {q} → {c[0]}")
                values.append([r[0] for r in v])
            heatmap = (list(scores.layer_names), cols, np.asarray(values).T.tolist())
    studies = run_studies(scores, query_recs, train_recs, config, views)
    overview = {
        "run": str(run),
        "scores stage": scores_name,
        "training sequences": str(n),
        "queries": str(n_q),
        "curvature": str(meta.get("curvature", "?")),
        "tracked layers": describe_layers(scores.layer_names)
        if scores.layer_names
        else "(not stored)",
        "token colouring": token_note,
        "studies": ", ".join(studies),
    }
    from influscope.evaluation.bank_report import validation_sections  # RUN/validation/*.json

    report = ReportView(
        title=title or f"influscope — {run.name}",
        overview=overview,
        queries=views,
        sections=[s.to_section() for s in studies.values()]
        + stored_sections(run)
        + validation_sections(run),
        layer_heatmap=heatmap,
    )
    payload = {name: result.to_dict() for name, result in studies.items()}
    atomic_write_json(run / "studies.json", payload)
    return report, studies
