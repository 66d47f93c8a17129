"""Recipes for a validation bank: the built-in deterministic fine-tune, or your own function.

A bank (:mod:`.bank`) needs ``weights (N,) → trained model``, ``model → (Q,)`` and the
fingerprints of what it is built for. :func:`finetune_recipe` makes all three from a base
model, a task, the training set and the queries with the built-in recipe
(:mod:`influscope.metagrad.recipe`: one seeded data order over all ``N`` rows, dropped rows
weighted 0, batch loss ``Σ_{i∈B} w_i L_i / |B_full|``, eval mode so dropout is off);
:func:`callable_recipe` does the same for a user's training function
``train_fn(model, task, train, weights) → trained model``, which must copy the model it is given
(the bank calls it many times on the same base model) and be deterministic (the bank checks).

The measurement is the task's (``log p(completion | prompt)`` summed over completion tokens
for ``causal_lm``), exactly what ``influscope score`` stores, so a scores stage of the bank's
full-run model can be checked against the bank.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from influscope.evaluation.bank import Measure, WeightedRecipe, bank_fingerprints
from influscope.metagrad.recipe import Finetune, FinetuneConfig
from influscope.metagrad.recipe import measure as task_measure
from influscope.tasks import EncodedDataset, Task, get_task

__all__ = ["BankRecipe", "callable_recipe", "finetune_recipe"]


@dataclass
class BankRecipe:
    """What :func:`~.bank.build_bank` takes, for one base model, data set and queries.

    Attributes:
        recipe: ``weights (N,) → trained model``.
        measure: ``model → (Q,)``.
        n_train: ``N``.
        fingerprints: Base model, data, queries and recipe fingerprints.
    """

    recipe: WeightedRecipe
    measure: Measure
    n_train: int
    fingerprints: dict[str, Any]


def _measure(task: Task, queries: EncodedDataset, batch_size: int) -> Measure:
    def measure(model: nn.Module) -> torch.Tensor:
        return task_measure(model, task, queries, batch_size)  # (Q,)

    return measure


def finetune_recipe(
    model: nn.Module,
    task: Task | str,
    train: EncodedDataset,
    queries: EncodedDataset,
    config: FinetuneConfig,
    batch_size: int = 8,
) -> BankRecipe:
    """The built-in deterministic fine-tune as a bank recipe.

    Args:
        model: The base model (copied; never modified).
        task: Task or its name.
        train: Training set (``N`` rows).
        queries: Queries whose measurements the bank stores.
        config: The fine-tune (epochs, lr, batch size, seed, optimizer, trained parameters).
        batch_size: Queries per measurement pass.
    """
    task = get_task(task)
    run = Finetune(model, task, train, config)

    def recipe(weights: torch.Tensor) -> nn.Module:
        theta, _ = run.run(weights)
        return run.model(theta)

    described = {"builtin": config.to_dict(), "task": type(task).__name__}
    return BankRecipe(
        recipe,
        _measure(task, queries, batch_size),
        len(train),
        bank_fingerprints(model, train, queries, described),
    )


def callable_recipe(
    train_fn: Callable[[nn.Module, Task, EncodedDataset, torch.Tensor], nn.Module],
    model: nn.Module,
    task: Task | str,
    train: EncodedDataset,
    queries: EncodedDataset,
    description: str,
    batch_size: int = 8,
) -> BankRecipe:
    """A user's training function as a bank recipe.

    Args:
        train_fn: ``train_fn(model, task, train, weights) → trained model``: train a copy of
            ``model`` on ``train`` with example ``i``'s loss weighted by ``weights[i]`` (0 =
            dropped). It is given a fresh copy of the base model on every call.
        model: The base model.
        task: Task or its name.
        train: Training set.
        queries: Queries.
        description: Text that changes whenever the function or its settings do (e.g. its
            source code); it is fingerprinted into the bank.
        batch_size: Queries per measurement pass.
    """
    task = get_task(task)

    def recipe(weights: torch.Tensor) -> nn.Module:
        return train_fn(copy.deepcopy(model), task, train, weights)

    digest = hashlib.sha256(description.encode()).hexdigest()[:16]
    return BankRecipe(
        recipe,
        _measure(task, queries, batch_size),
        len(train),
        bank_fingerprints(model, train, queries, {"callable": digest}),
    )
