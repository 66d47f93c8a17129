"""The facade: one object that composes the pipeline stages for a model and a task.

    model ─▶ tracked modules ─▶ fit curvature ─▶ precondition queries ─▶ score training data

Each stage is a plain function in its sub-package; :class:`Influence` only wires them
together, fingerprints inputs and stores results under a run directory.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from influscope.budget import fix_mmap_threshold, plan_score, release_heap
from influscope.config import FitConfig, ScoreConfig
from influscope.curvature import CURVATURES, CurvatureOperator
from influscope.curvature.run import fit_curvature
from influscope.curvature.streamed import StreamedOperator, aligned, partition_files
from influscope.engine.shards import PartialSums
from influscope.engine.stage import StageSpec, run_stage
from influscope.errors import ConfigError, DataError, MemoryBudgetError, StaleArtifactError
from influscope.modules.heads import head_splits
from influscope.modules.selection import TrackedLayer
from influscope.modules.tracked import TrackedModel
from influscope.scoring.damping import DampingSweep, damping_sweep, score_damping
from influscope.scoring.ensemble import MORE_MEMBERS, EnsembleScores
from influscope.scoring.pairwise import Scores, score_pass, self_influence_pass, token_pass
from influscope.scoring.queries import PreconditionedQueries, precondition_queries
from influscope.storage import RunDirectory
from influscope.storage.atomic import read_tensors
from influscope.storage.run import TENSORS
from influscope.tasks import EncodedDataset, Task, context_length
from influscope.tasks.base import quiet_length_warning
from influscope.tasks.data import record_list

if TYPE_CHECKING:
    from influscope.index import GradientIndex, IndexConfig, TopK
    from influscope.metagrad import MagicConfig


class Influence:
    """Influence of training sequences on queries, for one model and task.

    Args:
        model: A PyTorch / Hugging Face model.
        task: A :class:`~influscope.tasks.Task` or a name in :data:`influscope.TASKS`
            (``"causal_lm"``, ``"classification"``, ``"reward"``).
        modules: Modules to track: a preset (``"mlp"``, ``"all"``, ``"lora"``,
            ``"trainable"``), a regex, or a list. ``None`` (default): ``"lora"`` for a PEFT
            model with LoRA adapters, else ``"mlp"`` (:func:`~influscope.modules.default_modules`).
        run_dir: Where stages are stored (``None``: keep everything in memory).
        tokenizer: Used by :meth:`encode`.
        device: Where every stage runs; the model is moved there. Default: CUDA when
            available, else CPU.
        offload: Keep curvature factors in CPU memory; each layer's factors are copied to the
            device when used (saves accelerator memory for large models).

    Example:
        >>> inf = Influence(model, "causal_lm", modules="mlp", tokenizer=tok)  # doctest: +SKIP
        >>> train = inf.encode([{"text": "The capital of Velmora is Tarsk."}])  # doctest: +SKIP
        >>> factors = inf.fit(train)  # doctest: +SKIP
        >>> scores = inf.score(inf.encode(queries), train, factors)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        task: str | Task = "causal_lm",
        modules: str | Sequence[str] | None = None,
        run_dir: str | Path | None = None,
        tokenizer=None,
        device: str | torch.device | None = None,
        offload: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.offload = offload
        #: The model, task and tracked layers every stage runs on.
        self.tracked = TrackedModel.select(model.to(self.device), task, modules)
        self.run = RunDirectory(run_dir) if run_dir is not None else None
        self.tokenizer = tokenizer
        #: Shards of the last :meth:`fit` loaded from a previous (interrupted) run / computed /
        #: replayed from the in-memory cache (EK-FAC's second pass).
        self.last_fit_shards: dict[str, int] = {"loaded": 0, "computed": 0, "replayed": 0}
        #: The memory plan of the last fit computed here (:class:`influscope.budget.FitPlan`).
        self.last_fit_plan = None
        #: The preconditioned queries the last :meth:`score` computed with (the ones it was
        #: given, or those it preconditioned), ``None`` when it loaded its stored stage; the
        #: ``score`` command's report reuses them instead of a second query pass.
        self.last_preconditioned: PreconditionedQueries | None = None
        #: The batch size the last :meth:`score` computed here ran its training pass at (the
        #: config's, or less to fit the memory budget); ``None`` before any.
        self.last_score_batch: int | None = None

    @property
    def model(self) -> nn.Module:
        """The model (on :attr:`device`)."""
        return self.tracked.model

    @property
    def task(self) -> Task:
        return self.tracked.task

    @property
    def layers(self) -> list[TrackedLayer]:
        """The tracked layers, in module order."""
        return list(self.tracked.layers)

    @property
    def _factor_device(self) -> torch.device:
        return torch.device("cpu") if self.offload else self.device

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    # --- data ---------------------------------------------------------------------------
    def encode(self, records: Iterable[dict], truncate: bool = False) -> EncodedDataset:
        """Encode records with the task and the tokenizer, checking the model's context.

        Args:
            records: A list (or any iterable, e.g. a Hugging Face ``datasets.Dataset``) of
                dicts: ``{"text"}`` or ``{"prompt", "completion"}`` for causal LMs.
            truncate: Cut sequences longer than the model's context instead of failing.
        """
        if self.tokenizer is None:
            raise DataError(
                "encode() needs a tokenizer, but this Influence has none: pass tokenizer= to "
                "Influence(...) (e.g. AutoTokenizer.from_pretrained(model_dir))."
            )
        records = record_list(records)
        with quiet_length_warning(self.tokenizer, truncate):  # cut to the context: no warning
            return self.task.encode(records, self.tokenizer, context_length(self.model), truncate)

    def _check(self, data, what: str = "data") -> EncodedDataset:
        """``data`` as an :class:`EncodedDataset` that fits the model's context.

        Records (a list of dicts, a Hugging Face dataset) are encoded with :meth:`encode`.
        """
        if isinstance(data, PreconditionedQueries):
            raise DataError(
                f"{what} must be an EncodedDataset or a list of records; received preconditioned "
                "queries, which only the `queries` argument of score / token_scores accepts."
            )
        if not isinstance(data, EncodedDataset):
            data = self.encode(data)
        limit = context_length(self.model)
        if limit is not None and data.max_length() > limit:
            raise DataError(
                f"A sequence has {data.max_length()} tokens, longer than the model's context of "
                f"{limit}. Shorten or split it, or encode with truncate=True."
            )
        return data

    def _check_factors(self, factors) -> None:
        """Raise unless ``factors`` is a curvature operator covering every tracked layer."""
        if not isinstance(factors, CurvatureOperator):
            raise ConfigError(
                "factors must be the curvature operator returned by Influence.fit or "
                f"Influence.load_factors; received {type(factors).__name__}."
            )
        missing = [n for n in self.layer_names if n not in factors.layer_names]
        if missing:
            raise ConfigError(
                f"These factors were fitted on layers {factors.layer_names}, but this Influence "
                f"also tracks {missing}. Fit the factors with the same modules= as the "
                "Influence that uses them (or create it with the modules they were fitted on)."
            )

    def fingerprint(self) -> str:
        """Fingerprint of the model's architecture and tracked weights."""
        return self.tracked.fingerprint()

    # --- curvature ----------------------------------------------------------------------
    def fit(
        self,
        train: EncodedDataset,
        config: FitConfig | None = None,
        name: str = "factors",
        overwrite: bool = False,
    ) -> CurvatureOperator:
        """Fit (or load) the curvature on the training data.

        A stored stage with the same name is reused when model, data and config match, and
        refused with :class:`~influscope.errors.StaleArtifactError` when they do not.
        """
        config = _config(config, FitConfig)
        stage, train = self._fit_stage(self._check(train, "train"), config, name)

        def compute(store: PartialSums | None) -> CurvatureOperator:
            operator, self.last_fit_shards = fit_curvature(
                self.tracked,
                train,
                config,
                store=store,  # per-shard partial sums: a killed fit resumes
                amp_dtype=_amp(config.amp_dtype),
                on_plan=lambda plan: setattr(self, "last_fit_plan", plan),
            )
            return operator.to("cpu") if self.offload else operator

        result = run_stage(stage, compute, overwrite)
        if isinstance(result, StreamedOperator) and stage.stores:
            # a partitioned fit: its files now live in the stage directory (the partial
            # directory they were written to is gone)
            result = stage.read()
        return result

    def _model_dtype(self) -> str:
        """The dtype of the tracked layers' weights (``"float32"``, ``"bfloat16"``, …)."""
        weight = next(self.tracked.layers[0].module.parameters())
        return str(weight.dtype).removeprefix("torch.")

    def _fit_stage(
        self, train: EncodedDataset, config: FitConfig, name: str
    ) -> tuple[StageSpec[CurvatureOperator], EncodedDataset]:
        """The ``factors`` stage of :meth:`fit`, and the training data it is fitted on."""
        if config.max_examples is not None and config.max_examples < len(train):
            train = train.subset(range(config.max_examples))
        # Fingerprints (a hash of every tracked weight) only matter when stages are stored.
        expected = (
            {
                "config": config.fingerprint_dict(),
                "model": self.fingerprint(),
                "data": train.fingerprint(),
                "layers": self.layer_names,
            }
            if self.run is not None
            else {}
        )
        stage = StageSpec(
            self.run,
            "factors",
            name,
            expected,
            load=lambda tensors, meta: self._factors_from_stage(name, meta),
            dump=lambda op: (
                {} if isinstance(op, StreamedOperator) else op.tensors(),
                {
                    "curvature": config.curvature,
                    "damping": op.damping,
                    "model_dtype": self._model_dtype(),
                }
                | (
                    {"partitions": partition_files(op)[0]}
                    if isinstance(op, StreamedOperator)
                    else {}
                ),
            ),
            device=self._factor_device,  # CPU memory with offload=True
            files=lambda op: partition_files(op)[1] if isinstance(op, StreamedOperator) else None,
            lazy=True,  # _factors_from_stage reads the tensors (all, or one layer at a time)
        )
        return stage, train

    def _factors_from_stage(self, name: str, meta: dict, stream: bool = False) -> CurvatureOperator:
        """The operator of a stored factors stage (its metadata checked already).

        A partitioned fit (``meta["partitions"]``) is always streamed: a
        :class:`~influscope.curvature.streamed.StreamedOperator` reading one layer at a time
        from the partitions' files. A single-file stage is read whole, as it always was, or
        streamed from its one file with ``stream=True``.
        """
        curvature = meta["curvature"]
        directory = self.run.stage_dir("factors", name)
        parts = meta.get("partitions")
        if parts is None and not stream:
            # copied out of the mapped file: alignment as in a streamed read (bit-identical)
            tensors = aligned(read_tensors(directory / TENSORS, self._factor_device))
            return CURVATURES[curvature].operator.from_tensors(tensors, meta["damping"])
        if parts is not None:
            files = {layer: directory / p["file"] for p in parts for layer in p["layers"]}
        else:
            files = dict.fromkeys(meta.get("layers") or meta["damping"], directory / TENSORS)
        return StreamedOperator(curvature, files, meta["damping"], self._factor_device)

    def load_factors(
        self, train: EncodedDataset, name: str = "factors", stream: bool = False
    ) -> CurvatureOperator:
        """Load a stored curvature stage, checking it matches this model and training data.

        A stage fitted in module partitions is always streamed, and any stage with
        ``stream=True``: the returned
        :class:`~influscope.curvature.streamed.StreamedOperator` reads one layer's factors at a
        time when used (scores are bit-identical), so memory holds one layer's factors instead
        of all of them.

        Raises:
            StaleArtifactError: If the stage was fitted on another model or data set.
            DataError: If there is no run directory or no such stage.
        """
        train = self._check(train, "train")
        if self.run is None:
            raise DataError(
                "load_factors reads a stored stage, but this Influence has no run directory: "
                "create it with run_dir=... (the directory given to fit), or use the operator "
                "that Influence.fit returned."
            )
        if not self.run.exists("factors", name):
            raise DataError(
                f"No factors named {name!r} under {self.run.root}. Run "
                "`influscope fit` (or Influence.fit) first."
            )
        from influscope.config import FitConfig

        # Loading never refits, so the fix is to fit again (``overwrite`` here would not help).
        fix = (
            f"Fit the factors for this model, data and modules first: `influscope fit ... "
            f"--name {name} --overwrite` (Influence.fit(..., overwrite=True)), or fit them "
            "under another name and pass it (CLI: --factors NAME)."
        )
        meta = self.run.check("factors", name, {"layers": self.layer_names}, fix)
        fitted, now = meta.get("model_dtype"), self._model_dtype()
        if fitted is not None and fitted != now:  # before the fingerprint, which also differs
            raise StaleArtifactError(
                f"The factors {name!r} under {self.run.root} were fitted with the model in "
                f"{fitted}, but the model is now {now}. Expected a {fitted} model; received "
                f"{now}. Fix: load the model in {fitted} (model.to(torch.{fitted}); the CLI "
                f"loads float32), or refit the factors in {now} (Influence.fit(..., "
                f"overwrite=True), `influscope fit ... --name {name} --overwrite`, or another "
                "name)."
            )
        config = FitConfig.from_dict(meta["config"])
        if config.max_examples is not None and config.max_examples < len(train):
            train = train.subset(range(config.max_examples))
        expected = {"model": self.fingerprint(), "data": train.fingerprint()}
        stage = StageSpec(
            self.run,
            "factors",
            name,
            expected,
            load=lambda tensors, meta: self._factors_from_stage(name, meta, stream),
            device=self._factor_device,  # CPU memory with offload=True, like fit()
            fix=fix,
            lazy=True,
        )
        return stage.read()

    # --- scores -------------------------------------------------------------------------
    def precondition(
        self,
        queries: EncodedDataset | Sequence[dict],
        factors: CurvatureOperator,
        config: ScoreConfig | None = None,
        train: EncodedDataset | None = None,
        refine_store: PartialSums | None = None,
    ) -> PreconditionedQueries:
        """Preconditioned (optionally low-rank) query gradients.

        ``train`` is needed only for ``config.refine_steps > 0`` (the Gauss-Newton products of
        the refinement run over it). ``refine_store`` keeps refined query blocks on disk so an
        interrupted refinement resumes (:meth:`score` passes one when it stores its stage).
        """
        queries = self._check(queries, "queries")
        if factors is None:
            raise ConfigError(
                "precondition needs fitted factors (Influence.fit or load_factors); refinement "
                "uses them as its preconditioner."
            )
        self._check_factors(factors)
        config = _config(config, ScoreConfig)
        if config.per_head:  # refuse non-attention layers before the query pass
            head_splits(self.tracked.model, self.tracked.layers)
        train = None if train is None else self._check(train, "train")
        return precondition_queries(
            self.tracked,
            score_damping(factors, config),
            queries,
            config,
            train=train,
            refine_store=refine_store,
        )

    def score(
        self,
        queries: EncodedDataset | PreconditionedQueries,
        train: EncodedDataset,
        factors: CurvatureOperator,
        config: ScoreConfig | None = None,
        name: str | None = None,
        overwrite: bool = False,
        self_influence: bool = False,
    ) -> Scores:
        """Pairwise influence of every training sequence on every query.

        Returns:
            :class:`~influscope.scoring.pairwise.Scores` with ``pairwise`` of shape ``(Q, N)``;
            positive = up-weighting the training sequence increases the query's measurement.
        """
        config = _config(config, ScoreConfig)
        train = self._check(train, "train")
        self._check_factors(factors)
        if config.per_head:  # a layer that is not an attention projection: refuse before work
            head_splits(self.tracked.model, self.tracked.layers)
        # score-time damping override (ScoreConfig.damping / damping_factor); preconditioned
        # queries passed in keep the damping they were built with
        factors = score_damping(factors, config)
        given = isinstance(queries, PreconditionedQueries)
        if not given:
            queries = self._check(queries, "queries")
        # fingerprint of the encoded queries (preconditioned queries carry theirs as .source)
        source = queries.source if given else queries.fingerprint()
        stores = self.run is not None and name is not None
        expected = (
            {
                "config": config.fingerprint_dict(),
                "model": self.fingerprint(),
                "data": train.fingerprint(),
                "queries": source,
                "curvature": factors.name,
                "damping": factors.damping,
            }
            if stores
            else {}
        )

        def unfingerprinted() -> None:
            if source is None:
                raise StaleArtifactError(
                    f"A scores stage {name!r} exists in {self.run.root}, but these "
                    "preconditioned queries carry no fingerprint (source=None), so it "
                    "cannot be checked against them. Expected queries from "
                    "Influence.precondition / encode; pass overwrite=True to recompute "
                    "the stage, or choose another name."
                )

        stage = StageSpec(
            self.run,
            "scores",
            name,
            expected,
            load=lambda tensors, meta: Scores(
                layer_names=meta["layers"],
                train_indices=meta["train_indices"],
                head_names=meta.get("heads"),
                **tensors,
            ),
            dump=lambda s: (
                s.tensors(),
                {"layers": s.layer_names, "train_indices": s.train_indices}
                | ({"heads": s.head_names} if s.head_names else {}),
            ),
            device=self.device,  # like computed scores (they live where the model runs)
            # refined query blocks are kept until the stage is saved: a killed run resumes
            partial="refine-partial" if config.refine_steps > 0 and not given else None,
        )

        def compute(refine_store: PartialSums | None) -> Scores:
            # the memory budget: refused before any forward pass when one layer does not
            # fit; the batch size is lowered to fit (the stage's fingerprint keeps config's)
            n_queries = queries.n_queries if given else len(queries)
            is_streamed = isinstance(factors, StreamedOperator)
            streamed = factors.held_bytes() if is_streamed else 0.0
            if is_streamed:  # memory is tight: freed blocks go back to the system at once
                fix_mmap_threshold()
            batch = plan_score(self.tracked, train, n_queries, config, streamed)
            run_config = (
                config
                if batch == config.batch_size
                else dataclasses.replace(config, batch_size=batch)
            )
            pq = (
                queries
                if given
                else self.precondition(
                    queries, factors, run_config, train, refine_store=refine_store
                )
            )
            self.last_preconditioned = pq
            if not given:
                # the query pass leaves a streamed layer cached and freed blocks on the heap
                # (measured on a 10-block TinyLlama: +1.10 GiB held after it, +0.02 GiB after
                # this); then plan the training pass again from the measured resident size
                if is_streamed:
                    factors.release()
                release_heap()
                try:
                    again = plan_score(
                        self.tracked, train, n_queries, run_config, streamed, queries_held=True
                    )
                except MemoryBudgetError as exc:  # the queries are paid for: go on, warn
                    warnings.warn(
                        f"{exc} The queries are already preconditioned, so the training pass "
                        "runs at batch size 1 and may exceed the budget.",
                        stacklevel=3,
                    )
                    again = 1
                if again < batch:
                    run_config = dataclasses.replace(config, batch_size=again)
            self.last_score_batch = run_config.batch_size
            want_self = self_influence or config.normalize == "relatif"
            return score_pass(self.tracked, pq, train, run_config, factors, want_self)

        # a stored stage is loaded (or a stale one refused, or an unwritable run directory
        # refused) before any query pass: encoded queries are preconditioned inside compute
        self.last_preconditioned = None
        return run_stage(stage, compute, overwrite, before_load=unfingerprinted)

    def damping_sweep(
        self,
        queries: EncodedDataset | Sequence[dict],
        train: EncodedDataset,
        factors: CurvatureOperator,
        values: Sequence[float] | None = None,
        relative: Sequence[float] | None = None,
        config: ScoreConfig | None = None,
        k: int = 10,
        pairs: Sequence[tuple[int, int]] | None = None,
        check: Sequence[Sequence[int]] | None = None,
        lds: tuple | None = None,
    ) -> DampingSweep:
        """Score at many dampings from one fit, one pass over ``train``.

        See :func:`influscope.scoring.damping.damping_sweep` for the arguments and criteria.
        """
        queries = self._check(queries, "queries")
        train = self._check(train, "train")
        self._check_factors(factors)
        return damping_sweep(
            self.tracked,
            factors,
            queries,
            train,
            values,
            relative,
            _config(config, ScoreConfig),
            k,
            pairs,
            check,
            lds,
        )

    def score_ensemble(
        self,
        queries: EncodedDataset,
        train: EncodedDataset,
        fit_config: FitConfig | None = None,
        score_config: ScoreConfig | None = None,
        seeds: Sequence[int] = (0, 1, 2, 3),
        name: str | None = None,
        overwrite: bool = False,
    ) -> EnsembleScores:
        """Scores with error bars: one member per true-Fisher label-sampling seed.

        For each seed ``s`` the curvature is fitted with ``FitConfig(seed=s)`` (stored as
        ``factors-seed{s}`` under a run directory, so it resumes / is reused) and the queries
        are scored; the members give mean, standard error and top-``k`` rank stability
        (:class:`~influscope.scoring.ensemble.EnsembleScores`). With a run directory and a
        ``name`` the ensemble is stored as an ``ensemble`` stage, reused when model, data,
        queries, configs and seeds match and refused
        (:class:`~influscope.errors.StaleArtifactError`) when they do not.

        Raises:
            ConfigError: Fewer than 2 seeds, duplicate seeds, or an empirical Fisher (whose
                labels are not sampled, so seeds would give identical members).
        """
        fit_config = _config(fit_config, FitConfig)
        score_config = _config(score_config, ScoreConfig)
        seeds = [int(s) for s in seeds]
        if len(seeds) < 2:
            raise ConfigError(
                f"An ensemble needs at least 2 members to give error bars; received seeds "
                f"{seeds}. {MORE_MEMBERS}"
            )
        if len(set(seeds)) != len(seeds):
            raise ConfigError(
                f"Ensemble seeds must be distinct (a repeated seed repeats a member and "
                f"understates the spread); received {seeds}. Use e.g. seeds=(0, 1, 2, 3)."
            )
        if fit_config.fisher != "true":
            raise ConfigError(
                "An ensemble over label-sampling seeds needs fisher='true' (the empirical "
                f"Fisher samples no labels, so every seed gives the same member); received "
                f"fisher={fit_config.fisher!r}. Use FitConfig(fisher='true')."
            )
        queries = self._check(queries, "queries")
        train = self._check(train, "train")
        stores = self.run is not None and name is not None
        expected = (
            {
                "fit_config": {**fit_config.fingerprint_dict(), "seed": None},
                "config": score_config.fingerprint_dict(),
                "seeds": seeds,
                "model": self.fingerprint(),
                "data": train.fingerprint(),
                "queries": queries.fingerprint(),
                "layers": self.layer_names,
            }
            if stores
            else {}
        )
        stage = StageSpec(
            self.run,
            "ensemble",
            name,
            expected,
            load=EnsembleScores.from_stored,
            dump=lambda ens: (ens.tensors(), ens.meta()),
            device=self.device,
            partial=None,  # each member's factors are a stage of their own (resumable)
        )

        def compute(_: None) -> EnsembleScores:
            # every member's factors stage is checked (stale? writable?) before the first fit
            for s in seeds:
                member = dataclasses.replace(fit_config, seed=s)
                self._fit_stage(train, member, f"factors-seed{s}")[0].preflight()
            members = []
            for s in seeds:
                factors = self.fit(
                    train, dataclasses.replace(fit_config, seed=s), name=f"factors-seed{s}"
                )
                members.append(self.score(queries, train, factors, score_config))
            return EnsembleScores.from_members(members, labels=[f"seed {s}" for s in seeds])

        return run_stage(stage, compute, overwrite)

    def magic(
        self,
        queries: EncodedDataset | Iterable[dict],
        train: EncodedDataset | Iterable[dict],
        config: MagicConfig | None = None,
        name: str | None = None,
        overwrite: bool = False,
    ) -> Scores:
        """Exact metagradients (MAGIC) of a deterministic fine-tune of this model on ``train``.

        ``pairwise[q, i] = d f_q(θ_T) / d w_i`` at ``w = 1``: the derivative of query ``q``'s
        measurement after the fine-tune ``config.recipe`` with respect to example ``i``'s
        weight in its batches' losses (:mod:`influscope.metagrad.magic`; positive = up-weighting
        helps the query; ``N ×`` it is on the influence scale). With a run directory and a
        ``name`` the scores are stored as a ``magic`` stage (fingerprints of model, data,
        queries and config), refused when stale, and a killed run resumes from the reverse
        pass's last saved segment.

        Raises:
            ConfigError: REPLAY's memory exceeds ``config.memory_mb`` (before any work).
            StaleArtifactError: A stored stage ``name`` differs (unless ``overwrite``).
        """
        from influscope.metagrad import MagicConfig, magic_scores

        config = _config(config, MagicConfig)
        queries = self._check(queries, "queries")
        train = self._check(train, "train")
        stores = self.run is not None and name is not None
        expected = (
            {
                "config": config.fingerprint_dict(),
                "model": self.fingerprint(),
                "data": train.fingerprint(),
                "queries": queries.fingerprint(),
            }
            if stores
            else {}
        )
        stage = StageSpec(
            self.run,
            "magic",
            name,
            expected,
            load=lambda tensors, meta: Scores(
                layer_names=meta["parameters"], train_indices=meta["train_indices"], **tensors
            ),
            dump=lambda s: (
                s.tensors(),
                {"parameters": s.layer_names, "train_indices": s.train_indices},
            ),
            device=self.device,
        )
        return run_stage(
            stage,
            lambda store: magic_scores(self.tracked, train, queries, config, store),
            overwrite,
        )

    def self_influence(
        self, train: EncodedDataset, factors: CurvatureOperator, batch_size: int = 8
    ) -> torch.Tensor:
        """``∇L(z)^⊤ (G + λI)^{-1} ∇L(z)`` for each training sequence: ``(N,)``."""
        train = self._check(train, "train")
        self._check_factors(factors)
        return self_influence_pass(self.tracked, factors, train, batch_size)

    def token_scores(
        self,
        queries: EncodedDataset | PreconditionedQueries,
        train: EncodedDataset,
        factors: CurvatureOperator,
        config: ScoreConfig | None = None,
    ) -> list[torch.Tensor]:
        """Per-token influence: one ``(Q, T_m)`` tensor per training sequence (sums to its score)."""
        config = _config(config, ScoreConfig)
        train = self._check(train, "train")
        pq = (
            queries
            if isinstance(queries, PreconditionedQueries)
            else self.precondition(queries, factors, config, train)
        )
        return token_pass(self.tracked, pq, train, config.batch_size)

    # --- index ---------------------------------------------------------------------------
    def build_index(
        self,
        train: EncodedDataset,
        config: IndexConfig | None = None,
        factors: CurvatureOperator | None = None,
        name: str = "index",
        root: str | Path | None = None,
        overwrite: bool = False,
        second_moments: dict[str, torch.Tensor] | None = None,
    ) -> GradientIndex:
        """Write, resume or reuse the projected gradient index of ``train``.

        Stored under ``RUN/index/<name>`` (or ``root``); see :func:`influscope.index.build_index`.
        ``factors`` are needed for ``IndexConfig(init="pca")`` and ``init="eigen"``;
        ``second_moments`` (Adam's, by parameter name) for ``IndexConfig(optimizer="adam")``.

        Raises:
            DataError: With neither a run directory nor ``root``.
        """
        from influscope.index import build_index

        train = self._check(train, "train")
        if root is None and self.run is None:
            raise DataError(
                "build_index needs a place for its shards: pass root=... or create the "
                "Influence with run_dir=..."
            )
        root = Path(root) if root is not None else self.run.root / "index" / name
        return build_index(
            self.tracked, train, root, config, factors, overwrite, second_moments=second_moments
        )

    def query_index(
        self, queries: EncodedDataset, index: GradientIndex, k: int = 10, batch_size: int = 8
    ) -> TopK:
        """Top-``k`` training sequences of each query from a built index (a :class:`TopK`)."""
        from influscope.index import query_index

        queries = self._check(queries, "queries")
        return query_index(self.tracked, queries, index, k=k, batch_size=batch_size)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU.

    Raises:
        ConfigError: An unknown device string, or a CUDA device on a machine without CUDA.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"Unknown device {device!r} ({exc}). Expected a torch device such as 'cpu', 'cuda' "
            "or 'cuda:1', or None for CUDA when available."
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Device {device!r} asks for CUDA, but torch {torch.__version__} sees no CUDA "
            "device. Pass device='cpu' (CLI: --device cpu), or leave it unset to use CUDA only "
            "when present."
        )
    return resolved


def _config(config, cls: type):
    """``config`` (or ``cls()`` when ``None``), refusing anything that is not a ``cls``."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise ConfigError(
            f"config must be a {cls.__name__} (e.g. {cls.__name__}() with keyword fields); "
            f"received {type(config).__name__} {config!r}."
        )
    return config


def _amp(name: str | None) -> torch.dtype | None:
    from influscope.config import resolve_dtype

    return resolve_dtype(name)
