"""Uncertainty on influence scores: an ensemble of ``M`` member :class:`Scores`.

Members are scores of the same queries and training sequences computed under different
random choices (true-Fisher label-sampling seeds, checkpoints, ...). For query ``q`` and
training sequence ``n`` with member scores ``I^{(1)}, ..., I^{(M)}``:

.. math::

    \\bar I_{qn} = \\frac{1}{M} \\sum_m I^{(m)}_{qn}, \\qquad
    \\mathrm{sem}_{qn} = \\frac{1}{\\sqrt{M}} \\sqrt{\\frac{1}{M-1}
        \\sum_m \\big(I^{(m)}_{qn} - \\bar I_{qn}\\big)^2}.

Rank stability of ``n`` in the top-``k`` of ``q`` is the fraction of members in whose own
top-``k`` it appears: ``s_{qn} = \\frac{1}{M} \\sum_m [n ∈ \\mathrm{top}_k(I^{(m)}_q)]``.
The per-query stability is the mean of ``s_{qn}`` over the top-``k`` of the mean ``\\bar I_q``
(1 = every member agrees on the top-``k`` set; ``k/N`` is chance).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from influscope.errors import ConfigError, DataError
from influscope.scoring.pairwise import Scores, _as_int

# How to obtain more members, quoted by every "too few members" error.
MORE_MEMBERS = (
    "Fit with at least two true-Fisher label-sampling seeds: "
    "Influence.score_ensemble(..., seeds=(0, 1, 2, 3)) or `influscope score ... --ensemble 4` "
    "(or --seeds 0 1 2 3)."
)


@dataclass
class EnsembleScores:
    """Mean, standard error and rank stability of ``M ≥ 2`` member scores.

    Attributes:
        mean: ``(Q, N)`` mean score over members.
        sem: ``(Q, N)`` standard error of the mean: std over members (ddof=1) / sqrt(M).
        train_indices: Global index of each of the ``N`` training sequences.
        n_members: ``M``.
        members: ``(M, Q, N)`` member scores, or ``None`` when not kept (stability then
            needs them and raises).
        labels: A label per member (e.g. ``"seed 0"``).
    """

    mean: torch.Tensor
    sem: torch.Tensor
    train_indices: list[int]
    n_members: int
    members: torch.Tensor | None = None
    labels: list[str] = field(default_factory=list)

    @classmethod
    def from_members(
        cls, members: list[Scores], labels: list[str] | None = None, keep: bool = True
    ) -> EnsembleScores:
        """Build an ensemble from member scores of the same queries and training sequences.

        Args:
            members: ``M ≥ 2`` :class:`Scores`, each with ``pairwise (Q, N)``.
            labels: One label per member (default ``"member m"``).
            keep: Keep the ``(M, Q, N)`` member scores (needed by :meth:`top` stability).

        Raises:
            ConfigError: If fewer than two members are given, or labels do not match.
            DataError: If members differ in shape or training indices.
        """
        members = list(members)
        if len(members) < 2:
            raise ConfigError(
                f"An ensemble needs at least 2 members to give error bars (a standard error "
                f"over members); received {len(members)}. {MORE_MEMBERS}"
            )
        first = members[0]
        for m, s in enumerate(members[1:], start=1):
            if tuple(s.pairwise.shape) != tuple(first.pairwise.shape):
                raise DataError(
                    f"Ensemble members must score the same queries and training sequences: "
                    f"member 0 has pairwise shape {tuple(first.pairwise.shape)}, member {m} "
                    f"has {tuple(s.pairwise.shape)}. Score every member on the same data."
                )
            if list(s.train_indices) != list(first.train_indices):
                raise DataError(
                    f"Ensemble members must score the same training sequences in the same "
                    f"order: member {m}'s train_indices differ from member 0's. Score every "
                    "member on the same EncodedDataset."
                )
        labels = (
            list(labels) if labels is not None else [f"member {m}" for m in range(len(members))]
        )
        if len(labels) != len(members):
            raise ConfigError(
                f"Expected {len(members)} labels, one per member; received {len(labels)}."
            )
        stack = torch.stack([s.pairwise for s in members])  # (M, Q, N)
        return cls.from_tensor(stack, list(first.train_indices), labels, keep)

    @classmethod
    def from_tensor(
        cls,
        stack: torch.Tensor,
        train_indices: list[int],
        labels: list[str] | None = None,
        keep: bool = True,
    ) -> EnsembleScores:
        """Ensemble from stacked member scores ``stack (M, Q, N)``."""
        n_m = stack.shape[0]
        if n_m < 2:
            raise ConfigError(
                f"An ensemble needs at least 2 members to give error bars; received {n_m}. "
                f"{MORE_MEMBERS}"
            )
        mean = stack.mean(0)  # (Q, N)
        sem = stack.std(0, correction=1) / n_m**0.5  # (Q, N)
        return cls(
            mean=mean,
            sem=sem,
            train_indices=list(train_indices),
            n_members=n_m,
            members=stack if keep else None,
            labels=list(labels) if labels is not None else [f"member {m}" for m in range(n_m)],
        )

    @property
    def n_queries(self) -> int:
        return self.mean.shape[0]

    def _query(self, query) -> int:
        q = _as_int(query)
        if q is None or not -self.n_queries <= q < self.n_queries:
            raise ConfigError(
                f"query must be the position of a scored query, 0 ≤ query < {self.n_queries}; "
                f"received {query!r}."
            )
        return q

    def _k(self, k) -> int:
        kk = _as_int(k)
        if kk is None or kk < 0:
            raise ConfigError(f"k must be an integer ≥ 0, received {k!r}.")
        return min(kk, self.mean.shape[1])

    def _require_members(self) -> torch.Tensor:
        if self.members is None:
            raise ConfigError(
                "Rank stability needs the member scores, but this ensemble was built with "
                "keep=False. Rebuild it with EnsembleScores.from_members(..., keep=True)."
            )
        return self.members

    def in_member_top(self, k: int = 10) -> torch.Tensor:
        """``(M, Q, N)`` bool: is ``n`` in member ``m``'s own top-``k`` for query ``q``."""
        k = self._k(k)
        members = self._require_members()  # (M, Q, N)
        out = torch.zeros(members.shape, dtype=torch.bool, device=members.device)
        if k:
            idx = torch.topk(members, k, dim=-1).indices  # (M, Q, k)
            out.scatter_(-1, idx, True)
        return out

    def top(self, query: int, k: int = 10) -> list[tuple[int, float, float, float]]:
        """The ``k`` training sequences with the largest mean score for a query.

        Returns:
            ``[(position in the scored training set, mean, sem, stability), ...]`` best first,
            where stability is the fraction of members with that sequence in their top-``k``.
        """
        q, k = self._query(query), self._k(k)
        row = self.mean[q]  # (N,)
        idx = torch.topk(row, k).indices if k else torch.zeros(0, dtype=torch.long)
        freq = self.in_member_top(k)[:, q].double().mean(0) if k else None  # (N,)
        return [
            (int(i), float(row[i]), float(self.sem[q, i]), float(freq[i]))  # type: ignore[index]
            for i in idx
        ]

    def stability(self, k: int = 10) -> torch.Tensor:
        """``(Q,)`` mean over the mean's top-``k`` of the fraction of members keeping it in top-``k``."""
        k = self._k(k)
        if k == 0:
            return torch.ones(self.n_queries, dtype=torch.float64)
        freq = self.in_member_top(k).double().mean(0)  # (Q, N)
        idx = torch.topk(self.mean, k, dim=-1).indices  # (Q, k)
        return freq.gather(-1, idx.to(freq.device)).mean(-1)  # (Q,)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for storage (``mean``, ``sem`` and ``members`` when kept)."""
        out = {"mean": self.mean.contiguous(), "sem": self.sem.contiguous()}
        if self.members is not None:
            out["members"] = self.members.contiguous()
        return out

    def meta(self) -> dict:
        """JSON metadata for storage."""
        return {
            "train_indices": list(self.train_indices),
            "n_members": self.n_members,
            "labels": list(self.labels),
        }

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], meta: dict) -> EnsembleScores:
        """Inverse of :meth:`tensors` / :meth:`meta`."""
        return cls(
            mean=tensors["mean"],
            sem=tensors["sem"],
            train_indices=list(meta["train_indices"]),
            n_members=int(meta["n_members"]),
            members=tensors.get("members"),
            labels=list(meta.get("labels", [])),
        )
