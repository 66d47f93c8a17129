"""Kronfluence 1.0.1's EK-FAC on benchmark (a)'s model, modules, data and measurement.

Benchmark-only adapter (Kronfluence is never a dependency of influscope). Matched settings:

* the same trained float64 model, GPT-2 ``Conv1D`` layers converted to equivalent
  ``nn.Linear`` (:func:`common.to_linear`; Kronfluence tracks only ``nn.Linear``/``nn.Conv2d``),
  and the same tracked modules (every linear layer of the blocks, influscope's ``"all"``);
* the same training loss ``L(z) = Σ_t -log p(x_t | x_<t)`` and measurement
  ``f = log p(completion | prompt)`` (computed by influscope's :class:`CausalLMTask`), padding
  excluded from the covariances through the attention mask;
* true Fisher: labels sampled from the model's predictive distribution (Kronfluence's
  ``sample=True`` path), over the training set repeated :data:`lds_setup.FISHER_SAMPLES` times
  (so also 4 label samples per sequence);
* damping ``0.1 × mean(Λ_ℓ)`` per layer (Kronfluence's heuristic, ``damping_factor=None``,
  which is also influscope's default), every factor, gradient and score in float64.

Sign: Kronfluence returns ``∇f^⊤ (G + λ)^{-1} ∇L(z_i)``; influscope's ``df/dε_i`` is its
negative, so :func:`kronfluence_scores` returns ``-scores``.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings

import torch

from benchmarks.common import ExampleRows, to_linear
from benchmarks.lds_setup import Setup

F64 = torch.float64


def kronfluence_scores(setup: Setup, batch_size: int = 32) -> torch.Tensor:
    """``(Q, N)`` Kronfluence EK-FAC scores in influscope's sign convention (float64)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    ours = setup.task
    names = setup.influence().layer_names

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = ours.outputs(model, batch)[:, :-1]  # (B, T-1, V)
            targets = batch["labels"][:, 1:]  # (B, T-1)
            mask = targets != -100
            if sample:  # true Fisher: y ~ p_θ(· | x_<t)
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), -1)  # (B, T-1, V)
                    sampled = torch.multinomial(probs.flatten(0, 1), 1).view(targets.shape)
                targets = torch.where(mask, sampled, targets)
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.clamp_min(0).flatten(), reduction="none"
            ).view(targets.shape)  # (B, T-1)
            return (ce * mask).sum()

        def compute_measurement(self, batch, model):
            return ours.measurement(model, batch).sum()  # Σ_q log p(completion_q | prompt_q)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    model = to_linear(copy.deepcopy(setup.model)).double().eval()
    task = LMTask()
    model = prepare_model(model, task)
    torch.manual_seed(0)  # label samples
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=False,
        activation_covariance_dtype=F64,
        gradient_covariance_dtype=F64,
        eigendecomposition_dtype=F64,
        per_sample_gradient_dtype=F64,
        lambda_dtype=F64,
    )
    score_args = ScoreArguments(
        damping_factor=None,
        per_sample_gradient_dtype=F64,
        precondition_dtype=F64,
        score_dtype=F64,
    )
    fit, train = ExampleRows(setup.fit_data().examples), ExampleRows(setup.train.examples)
    queries = ExampleRows(setup.queries.examples)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("lds", model, task, cpu=True, disable_tqdm=True, output_dir=out)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=ours.collate))
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=fit,
            per_device_batch_size=batch_size,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="s",
            factors_name="ekfac",
            query_dataset=queries,
            train_dataset=train,
            per_device_query_batch_size=batch_size,
            per_device_train_batch_size=batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("s")["all_modules"]  # (Q, N)
    logging.disable(logging.NOTSET)
    return -scores.double()
