"""Tiny problems where exact curvature is computable: for tests, benchmarks and docs.

:func:`mlp_problem` trains a tanh MLP classifier with weight decay on noisy teacher labels (one
"token" per example), in float64, and returns it with training and query sets. The task,
:class:`VectorClassificationTask`, is also the reference example of a user-defined task: two
required methods (``training_loss``, ``measurement``) plus the optional output split used by the
exact Gauss-Newton oracle.

For ground-truth evaluations (leave-one-out, LDS, PBRF; the CI floors in
``tests/test_evaluation*.py`` and ``benchmarks/accuracy_exact.py``) the same network comes as
pieces: :func:`make_classification` draws Gaussian features labelled by a noisy linear teacher
(:class:`ToyData`) and :func:`train_mlp` is a deterministic full-batch AdamW
``(subset, seed) → model`` recipe for :class:`~influscope.evaluation.RetrainingHarness`.

:func:`tiny_gpt2` and :func:`random_lm_data` are a randomly initialised GPT-2 (float64, eager
attention) and random token sequences: the language-model fixtures of the tests and of
``benchmarks/refine_convergence.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from influscope.errors import ConfigError
from influscope.tasks import EncodedDataset, Task, sample_categorical

__all__ = [
    "MLP",
    "TabularMLP",
    "ToyData",
    "VectorClassificationTask",
    "make_classification",
    "mlp_problem",
    "random_lm_data",
    "tiny_gpt2",
    "tiny_gpt2_config",
    "train_mlp",
]


class MLP(nn.Module):
    """``x → l3(tanh(l2(tanh(l1(x)))))``."""

    def __init__(self, d: int = 4, h: int = 16, c: int = 4) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


class VectorClassificationTask(Task):
    """Feature vectors ``x`` with class labels ``y``; margin measurement."""

    name = "vector_classification"

    def outputs(self, model, batch):
        return model(batch["x"])

    def loss_from_outputs(self, outputs, batch, sample_seeds=None):
        y = batch["y"] if sample_seeds is None else sample_categorical(outputs, sample_seeds)
        return F.cross_entropy(outputs, y, reduction="none")

    def training_loss(self, model, batch, sample_seeds=None):
        return self.loss_from_outputs(self.outputs(model, batch), batch, sample_seeds)

    def measurement(self, model, batch):
        logits, y = self.outputs(model, batch), batch["y"]
        others = logits.scatter(1, y[:, None], float("-inf"))
        return logits.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, 1)

    def token_mask(self, batch):
        return None


def mlp_problem(
    n: int = 512,
    d: int = 4,
    h: int = 16,
    n_queries: int = 8,
    weight_decay: float = 2.0,
    steps: int = 400,
    seed: int = 0,
) -> tuple[MLP, EncodedDataset, EncodedDataset]:
    """Train an MLP (AdamW, weight decay) on noisy labels; return ``(model, train, queries)``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    teacher = torch.randn(d, 4, generator=g, dtype=torch.float64)
    y = (x @ teacher + 2.0 * torch.randn(n, 4, generator=g, dtype=torch.float64)).argmax(1)
    model = MLP(d, h).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    train = EncodedDataset([{"x": x[i], "y": y[i]} for i in range(n)])
    xq = torch.randn(n_queries, d, generator=g, dtype=torch.float64)
    queries = EncodedDataset(
        [{"x": xq[i], "y": (xq[i] @ teacher).argmax()} for i in range(n_queries)]
    )
    return model, train, queries


#: The MLP under its evaluation name (``d → h → h → c`` tanh classifier).
TabularMLP = MLP


@dataclass
class ToyData:
    """Features and labels of a toy classification problem.

    Attributes:
        x: ``(N, d)`` training features; ``y``: ``(N,)`` labels.
        xq: ``(Q, d)`` query features; ``yq``: ``(Q,)`` their teacher labels.
    """

    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor

    def train(self) -> EncodedDataset:
        return EncodedDataset([{"x": self.x[i], "y": self.y[i]} for i in range(len(self.y))])

    def queries(self) -> EncodedDataset:
        return EncodedDataset([{"x": self.xq[i], "y": self.yq[i]} for i in range(len(self.yq))])


def make_classification(
    n: int = 256, n_queries: int = 8, d: int = 4, c: int = 4, noise: float = 2.0, seed: int = 0
) -> ToyData:
    """Gaussian features, labels ``argmax(x W + noise·ε)`` of a random linear teacher (float64)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d, c, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ teacher + noise * torch.randn(n, c, generator=g, dtype=torch.float64)).argmax(1)
    xq = torch.randn(n_queries, d, generator=g, dtype=torch.float64)
    return ToyData(x, y, xq, (xq @ teacher).argmax(1))


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    subset: Sequence[int] | None = None,
    seed: int = 0,
    *,
    hidden: int = 16,
    steps: int = 400,
    lr: float = 1e-2,
    weight_decay: float = 2.0,
) -> TabularMLP:
    """Full-batch AdamW on the mean cross-entropy of ``subset`` (deterministic given ``seed``).

    Raises:
        ConfigError: Non-positive ``steps`` or ``lr``.
    """
    if steps < 1 or lr <= 0:
        raise ConfigError(f"steps and lr must be positive, received {steps}, {lr}.")
    idx = torch.as_tensor(list(subset) if subset is not None else range(len(y)))
    xs, ys = x[idx], y[idx]  # (n, d), (n,)
    torch.manual_seed(seed)
    model = TabularMLP(x.shape[1], hidden, int(y.max()) + 1).to(x.dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# --- tiny language models (randomly initialised, built from a config: nothing downloaded) ---
def tiny_gpt2_config(**fields) -> GPT2Config:
    """A 2-head GPT-2 config with dropout off and eager attention (deterministic, float64-safe)."""
    cfg = GPT2Config(n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **fields)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_gpt2(
    n_embd: int = 16,
    n_layer: int = 2,
    vocab: int = 32,
    n_positions: int = 32,
    seed: int = 0,
    dtype=torch.float64,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 with its native Conv1D layers."""
    torch.manual_seed(seed)
    cfg = tiny_gpt2_config(
        n_embd=n_embd,
        n_layer=n_layer,
        vocab_size=vocab,
        n_positions=n_positions,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def random_lm_data(
    n: int, vocab: int = 32, min_len: int = 5, max_len: int = 12, seed: int = 0, prompt_len: int = 0
) -> EncodedDataset:
    """Random token sequences of varied length (``prompt_len`` > 0 masks a prompt)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        t = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (t,), generator=g)
        labels = ids.clone()
        labels[:prompt_len] = -100
        examples.append(
            {"input_ids": ids, "attention_mask": torch.ones(t, dtype=torch.long), "labels": labels}
        )
    return EncodedDataset(examples)


_MOE_COMMON = dict(
    vocab_size=32,
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    num_experts_per_tok=2,
)


def tiny_moe(arch: str = "mixtral", seed: int = 0) -> nn.Module:
    """A float64 two-layer MoE LM (4 experts, top-2, hidden 8) with fused transformers 5.x
    experts: ``arch`` is ``"mixtral"``, ``"qwen2_moe"`` (with a shared expert) or ``"olmoe"``.
    Eager attention and experts (``grouped_mm`` has no float64 kernel); routers randomised."""
    from transformers import (
        MixtralConfig,
        MixtralForCausalLM,
        OlmoeConfig,
        OlmoeForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "mixtral":
        cfg = MixtralConfig(intermediate_size=6, num_local_experts=4, **_MOE_COMMON)
        cls = MixtralForCausalLM
    elif arch == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            intermediate_size=6,
            moe_intermediate_size=6,
            shared_expert_intermediate_size=6,
            num_experts=4,
            **_MOE_COMMON,
        )
        cls = Qwen2MoeForCausalLM
    else:
        cfg = OlmoeConfig(intermediate_size=6, num_experts=4, **_MOE_COMMON)
        cls = OlmoeForCausalLM
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = cls(cfg).double().eval()
    with torch.no_grad():  # Qwen2-MoE / OLMoE routers start at zero: give them a routing
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
    return model
