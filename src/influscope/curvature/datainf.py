"""DataInf: a closed-form inverse curvature from stored per-example gradients.

Kwon, Wu, Wu & Zou 2024, "DataInf: Efficiently Estimating Data Influence in LoRA-tuned LLMs and
Diffusion Models" (ICLR 2024), §3 eq. (5). Per layer ℓ, with per-sequence training-loss
gradients ``g_i`` (flattened ``(out, in)`` matrices, ``i = 1..n``) and
``G_ℓ = (1/n) Σ_i g_i g_iᵀ``, DataInf swaps the inverse and the average:

.. math::

    (G_ℓ + λ_ℓ I)^{-1} = \\Big(\\tfrac1n Σ_i (g_i g_iᵀ + λ_ℓ I)\\Big)^{-1}
    ≈ \\tfrac1n Σ_i (g_i g_iᵀ + λ_ℓ I)^{-1}
    = \\frac{1}{n λ_ℓ} Σ_i \\Big(I − \\frac{g_i g_iᵀ}{λ_ℓ + ‖g_i‖²}\\Big),

each term inverted in closed form by Sherman–Morrison. With ``n = 1`` the approximation is
exact; with ``n > 1`` it is not (the error grows with ``‖g_i‖²/λ``, see the paper's Theorem 1),
which the tests show. Applied to ``q`` (no ``P × P`` matrix is formed)::

    precondition(q) = (1/λ) (q − (1/n) Σ_i g_i (g_iᵀ q) / (λ + ‖g_i‖²))
    quadratic(q)    = (1/λ) (‖q‖² − (1/n) Σ_i (g_iᵀ q)² / (λ + ‖g_i‖²))

computed in chunks of ``i`` in float64. The default damping is the paper's
``λ_ℓ = 0.1 · (n d_ℓ)^{-1} Σ_i ‖g_i‖²``, i.e. influscope's relative damping ``0.1 × tr(G_ℓ)/d_ℓ``
(the mean eigenvalue of ``G_ℓ``).

**Memory.** The operator keeps all ``n`` per-example gradients of every tracked layer,
``n · Σ_ℓ out_ℓ in_ℓ`` numbers (in the stats dtype, never wider than the captured gradients).
It is meant for LoRA-sized layers (``modules="lora"``: ``A`` is ``r × in``, ``B`` is
``out × r``), where that is small; the fit refuses to start above ``FitConfig.datainf_memory_mb``.
Scoring costs ``O(n · P)`` per preconditioned query, and self-influence ``O(n · P)`` per
training sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from influscope.curvature.base import CurvatureOperator, relative_damping, split_keys
from influscope.curvature.spec import CurvatureSpec, EstimateRow, FitFootprint
from influscope.engine.shards import ShardedPasses, gather_shards
from influscope.errors import ConfigError, NumericalError

if TYPE_CHECKING:
    from influscope.config import FitConfig
    from influscope.modules.selection import TrackedLayer

#: Bytes of float64 gradient rows handled at once by ``precondition``/``quadratic``.
CHUNK_BYTES = 2**26


class DataInfOperator(CurvatureOperator):
    """DataInf's averaged Sherman–Morrison inverse over stored per-example gradients.

    Args:
        grads: ``{layer: (n, out, in)}`` per-sequence training-loss gradients.
        damping: ``{layer: λ_ℓ}``, each ``> 0``.
    """

    name = "datainf"

    def __init__(self, grads: dict[str, torch.Tensor], damping: dict[str, float]) -> None:
        super().__init__(damping)
        self.grads = grads  # {layer: (n, out, in)}
        self.sq_norms = {k: _sq_norms(g) for k, g in grads.items()}  # {layer: (n,) float64}

    def _chunks(self, layer: str, device: torch.device):
        """``(g (c, P) float64, λ + ‖g‖² (c,) float64)`` for consecutive chunks of rows."""
        g = self.grads[layer]
        step = max(1, CHUNK_BYTES // (8 * g[0].numel()))
        denom = self.sq_norms[layer] + self.damping[layer]  # (n,)
        for s in range(0, g.shape[0], step):
            rows = g[s : s + step].reshape(-1, g[0].numel()).to(device, torch.float64)
            yield rows, denom[s : s + step].to(device)

    def precondition(self, layer: str, q: torch.Tensor) -> torch.Tensor:
        """``(1/λ)(q − (1/n) Σ_i g_i (g_iᵀq)/(λ + ‖g_i‖²))`` for ``q`` of shape ``(..., out, in)``."""
        lam, n = self.damping[layer], self.grads[layer].shape[0]
        flat = q.reshape(-1, q.shape[-2] * q.shape[-1]).double()  # (B, P)
        acc = torch.zeros_like(flat)  # (B, P)
        for rows, denom in self._chunks(layer, q.device):
            coef = (flat @ rows.t()) / denom  # (B, c)
            acc += coef @ rows  # (B, P)
        return ((flat - acc / n) / lam).reshape(q.shape).to(q.dtype)

    def quadratic(self, layer: str, q: torch.Tensor) -> torch.Tensor:
        """``(1/λ)(‖q‖² − (1/n) Σ_i (g_iᵀq)²/(λ + ‖g_i‖²))`` for ``q`` of shape ``(B, out, in)``."""
        lam, n = self.damping[layer], self.grads[layer].shape[0]
        flat = q.reshape(q.shape[0], -1).double()  # (B, P)
        acc = torch.zeros(flat.shape[0], dtype=torch.float64, device=q.device)  # (B,)
        for rows, denom in self._chunks(layer, q.device):
            acc += ((flat @ rows.t()).square() / denom).sum(1)  # (B,)
        return ((flat.square().sum(1) - acc / n) / lam).to(q.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}::grads": g for name, g in self.grads.items()}

    @classmethod
    def from_tensors(cls, tensors, damping) -> DataInfOperator:
        return cls({k: v["grads"] for k, v in split_keys(tensors).items()}, damping)

    def inverse_dense(self, layer: str) -> torch.Tensor:
        """The DataInf matrix ``(1/(nλ)) Σ_i (I − g_i g_iᵀ/(λ + ‖g_i‖²))``: ``(P, P)`` (tests)."""
        g = self.grads[layer].reshape(self.grads[layer].shape[0], -1).double()  # (n, P)
        lam, n, p = self.damping[layer], g.shape[0], g.shape[1]
        w = 1.0 / (self.sq_norms[layer].to(g.device) + lam)  # (n,)
        eye = torch.eye(p, dtype=torch.float64, device=g.device)
        return (eye - (g.t() * w) @ g / n) / lam

    def dense(self, layer: str) -> torch.Tensor:
        """The damped curvature DataInf implies: the inverse of :meth:`inverse_dense` (tests)."""
        return torch.linalg.inv(self.inverse_dense(layer))


def _sq_norms(g: torch.Tensor) -> torch.Tensor:
    """``‖g_i‖²`` in float64 for ``g`` of shape ``(n, out, in)``, without a float64 copy of ``g``."""
    step = max(1, CHUNK_BYTES // (8 * max(g[0].numel(), 1))) if g.shape[0] else 1
    parts = [
        g[s : s + step].double().square().sum(dim=(-2, -1)) for s in range(0, g.shape[0], step)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=g.device)


def gradient_bytes(n: int, layers: list[TrackedLayer], itemsize: int) -> int:
    """Bytes of ``n`` stored per-example gradients of ``layers``."""
    return n * sum(layer.out_dim * layer.in_dim for layer in layers) * itemsize


def _storage_dtype(layers: list[TrackedLayer], config: FitConfig) -> torch.dtype:
    """The stats dtype, but never wider than the captured gradients (float64 only for float64
    models)."""
    model_f64 = layers[0].adapter.weight(layers[0].module).dtype == torch.float64
    return torch.float64 if model_f64 and config.stats_dtype == "float64" else torch.float32


def check_budget(n: int, layers: list[TrackedLayer], config: FitConfig) -> None:
    """Refuse a DataInf fit whose gradient store exceeds ``config.datainf_memory_mb``.

    Raises:
        ConfigError: Naming the size and how to shrink it.
    """
    itemsize = _storage_dtype(layers, config).itemsize
    need = gradient_bytes(n, layers, itemsize)
    budget = config.datainf_memory_mb * 2**20
    if need > budget:
        params = sum(layer.out_dim * layer.in_dim for layer in layers)
        raise ConfigError(
            f"curvature='datainf' stores every per-example gradient: {n} examples × {params:,} "
            f"tracked parameters ({len(layers)} layers) × {itemsize} B = {need / 2**20:,.1f} MiB, "
            f"above datainf_memory_mb={config.datainf_memory_mb:g} MiB. DataInf is meant for "
            "LoRA-sized layers: track the adapters (modules='lora'), fit on fewer examples "
            "(FitConfig.max_examples), track fewer layers, or raise datainf_memory_mb if the "
            "memory is there."
        )


def fit_datainf(passes, layers: list[TrackedLayer], config: FitConfig) -> DataInfOperator:
    """One pass storing each sequence's training-loss gradient per layer (true or empirical
    Fisher labels as ``config.fisher`` says); damping ``factor × (n d_ℓ)^{-1} Σ_i ‖g_i‖²``."""
    dtype = _storage_dtype(layers, config)
    dev = layers[0].adapter.weight(layers[0].module).device
    if isinstance(passes, ShardedPasses):
        check_budget(passes.n_examples, layers, config)

    def zeros(m: int) -> dict[str, torch.Tensor]:
        return {
            t.name: torch.zeros(m, t.out_dim, t.in_dim, dtype=dtype, device=dev) for t in layers
        }

    def compute(batches) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {t.name: [] for t in layers}
        for _, grads, _ in batches:
            for name, lb in grads.items():
                parts[name].append(lb.gradient().to(dtype))  # (B, out, in)
        return {k: torch.cat(v) if v else zeros(0)[k] for k, v in parts.items()}

    grads = gather_shards(passes, "gradients", compute, zeros)
    op = DataInfOperator(grads, {name: 0.0 for name in grads})
    for t in layers:
        sq = op.sq_norms[t.name]  # (n,)
        if sq.numel() == 0:
            raise ConfigError("curvature='datainf' needs at least one training example.")
        # relative damping over the per-coordinate mean: (1/(n d)) Σ_i ‖g_i‖²
        lam = relative_damping(sq / (t.out_dim * t.in_dim), config.damping_factor, config.damping)
        if not lam > 0:  # also catches NaN
            raise NumericalError(
                f"DataInf damping of layer {t.name!r} is {lam} (expected > 0): every training "
                "gradient of that layer is zero (e.g. a LoRA A matrix while B = 0) or not "
                "finite, so 0.1 × mean ‖g‖²/d vanishes. Give an absolute FitConfig.damping > 0, "
                "or leave that layer out of modules."
            )
        op.damping[t.name] = lam
    return op


def check_config(config: FitConfig) -> None:
    """DataInf divides by λ, so the damping must be positive."""
    if not (config.damping > 0 if config.damping is not None else config.damping_factor > 0):
        raise ConfigError(
            "curvature='datainf' divides by the damping λ (its inverse is a sum of "
            "(1/λ)(I − g gᵀ/(λ + ‖g‖²)) terms), so λ must be > 0; received "
            f"damping={config.damping}, damping_factor={config.damping_factor}. Leave damping=None "
            "with damping_factor > 0 (default 0.1), or give an absolute damping > 0."
        )


def datainf_estimate(f: FitFootprint) -> list[EstimateRow]:
    """Every per-example gradient in memory and on disk, plus a batch of them."""
    return [
        (
            "fit: gradients",
            f.pass_bytes + 4 * (f.n_fit + f.batch_size) * f.params,
            4 * f.n_fit * f.params,
            f"{f.n_fit} gradients × {f.params} params",
        )
    ]


SPEC = CurvatureSpec(
    "datainf",
    DataInfOperator,
    fit_datainf,
    estimate=datainf_estimate,
    check=check_config,
)
