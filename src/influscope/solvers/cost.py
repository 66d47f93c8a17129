"""What a refinement will cost, said before its first iteration, and its progress bar.

The cost of a refinement is a number of Gauss-Newton products, each a pass over the training
sequences (or ``refine_examples`` of them) with a forward, a vmapped jvp and a vmapped vjp per
mini-batch. :class:`RefineMeter` times the first mini-batch of the first product and
extrapolates::

    seconds ≈ t(first mini-batch) × mini-batches per product × products × query blocks
              + t(P^{-1}, one query) × preconditionings × queries

with ``products = steps + 1`` (the starting residual), plus the power iterations of an
automatic step (Neumann reuses the first for its first step), and ``steps`` (plus the power
iterations but one) preconditionings ``P^{-1}r`` of a dense residual per query. The time of
one ``P^{-1}r`` is twice that of forming the dense ``P^{-1}∇f`` from the query's token rows
(one dense rotation instead of two), which the caller measures before the refinement
(:attr:`RefineMeter.precondition_seconds`); on SmolLM2 it is about as large as a product.

Its memory estimate is the solver's vectors, :data:`STATE_VECTORS` ``× Q × P`` numbers per block, plus at most the
product's tangent budget (:attr:`GaussNewtonProduct.memory_budget`), plus what is resident
anyway when the caller says so (``RefineMeter(resident=...)``: the model's parameters and the
preconditioner's factors); activations come on top. The estimate goes to the
``influscope.solvers`` logger and, while progress bars are on
(:func:`influscope.progress.progress_enabled`), to stderr; a progress bar over the iterations
shows the largest relative residual of the block.
"""

from __future__ import annotations

import logging
import math
import sys

import torch

from influscope.progress import progress_enabled

logger = logging.getLogger("influscope.solvers")

#: Vectors of ``Q × P`` numbers a solver block holds at once: CG and Neumann hold four
#: (``v``, ``r``, the search direction or ``P^{-1}r``, and its product), ASTRA five (``b``
#: too); ``P^{-1}r`` of one query at a time comes on top. (The power iterations of an
#: automatic Neumann / ASTRA step hold two or three more while they run.)
STATE_VECTORS = 5


def state_bytes(n_queries: int, n_params: int, dtype: torch.dtype) -> int:
    """Bytes of the solver's vectors for ``n_queries`` queries of ``n_params`` parameters."""
    return STATE_VECTORS * n_queries * n_params * torch.empty((), dtype=dtype).element_size()


def _say(text: str) -> None:
    logger.info(text)
    if progress_enabled():
        print(text, file=sys.stderr, flush=True)


class RefineMeter:
    """Announces the estimated time and memory of a refinement and shows its progress.

    Args:
        blocks: Query blocks the refinement is run in (the estimate covers all of them).
        resident: Bytes held anyway during the solve (model parameters, preconditioner
            factors), added to the memory estimate when given.
    """

    def __init__(self, blocks: int = 1, resident: int = 0) -> None:
        self.blocks = blocks
        self.resident = resident
        #: Seconds of one dense ``P^{-1}r`` for one query (0: not measured, not estimated).
        self.precondition_seconds = 0.0
        self.queries = 0
        self.announced = False
        self.method = "cg"
        self.what = ""
        self.memory = ""

    def begin(self, method: str, x: torch.Tensor, product, n_examples: int) -> None:
        """Record the block's size before its first product."""
        self.method = method
        q, p = x.shape
        self.queries = q
        gib = state_bytes(q, p, x.dtype) / 2**30
        budget = product.memory_budget / 2**30
        self.what = (
            f"{self.blocks} block(s) of ≤ {q} queries × {p:,} parameters, Gauss-Newton "
            f"products over {n_examples} training sequences"
        )
        held = (
            f" + {self.resident / 2**30:.2f} GiB of model and factors (activations not included)"
            if self.resident
            else " (model and activations not included)"
        )
        self.memory = (
            f"memory ≈ {gib:.2f} GiB of solver vectors + ≤ {budget:.2f} GiB of product "
            f"tangents{held}"
        )

    def first_product(self, products: int, preconditionings: int = 0):
        """The ``on_batch`` callback of the first product: announces the estimate once.

        Args:
            products: Gauss-Newton products per block.
            preconditionings: Dense ``P^{-1}r`` per query (timed by
                :attr:`precondition_seconds` when it is set).
        """

        def on_batch(done: int, total: int, seconds: float) -> None:
            if self.announced or done != 1:
                return
            self.announced = True
            eta = seconds * total * products * self.blocks
            pre = self.precondition_seconds * preconditionings * self.queries * self.blocks
            also = (
                f" + {preconditionings} preconditioning(s) per query of "
                f"≈ {self.precondition_seconds:.2f} s"
                if pre
                else ""
            )
            _say(
                f"refine ({self.method}): {self.what}; {products} products per block, "
                f"{total} mini-batch(es) each{also}; estimated {_duration(eta + pre)} "
                f"(first mini-batch {seconds:.2f} s); {self.memory}."
            )

        return on_batch

    def note_alpha(self, alpha: torch.Tensor) -> None:
        """Report the automatic step sizes."""
        logger.info(
            "refine (%s): automatic step α = 1/μ̂ per query: %s",
            self.method,
            ", ".join(f"{float(a):.3g}" for a in alpha),
        )

    def bar(self, steps: int):
        """A progress bar over ``steps`` iterations (``None`` when bars are off)."""
        if steps == 0:
            return None
        from influscope.progress import bar

        return bar(steps, f"refine ({self.method})", unit="step")

    def step(self, bar, residuals: torch.Tensor) -> None:
        """Advance the bar, showing the block's largest relative residual."""
        if bar is not None:
            bar.set_postfix(residual=f"{float(residuals.max()):.3g}", refresh=False)
            bar.update(1)

    def close(self, bar) -> None:
        """Close the bar."""
        if bar is not None:
            bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown time"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
