"""Fingerprints that tie a stored stage to the model and data it was computed from.

* model: SHA-256 over every parameter's name and shape, the bytes of the tracked layers'
  weights (so a fine-tuned copy of the same architecture gets a different fingerprint), and
  the bytes of an evenly strided sample of at most :data:`SAMPLE` elements of every other
  parameter. The sample matters when the tracked weights are not the whole story: with
  ``modules="lora"`` two adapters can be identical (LoRA's ``B`` starts at zero) on top of
  different base models, and untracked weights shape every tracked layer's inputs and
  output gradients. Training changes almost every element, so the sample catches it, at a
  cost independent of the model's size; the bytes are read from the parameter's own device
  and dtype, so the fingerprint is the same on CPU and GPU.
* data: :meth:`EncodedDataset.fingerprint` (token ids, masks, global indices).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from influscope.tasks.data import EncodedDataset

if TYPE_CHECKING:  # (modules imports this module: no import at run time)
    from influscope.modules.selection import TrackedLayer

#: Elements sampled from each untracked parameter.
SAMPLE = 4096


def _bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (any device or dtype)."""
    return t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module, layers: Sequence[TrackedLayer]) -> str:
    """A short hex digest of the architecture, the tracked weights and the other weights.

    Tracked weights enter in full; every other parameter through :data:`SAMPLE` evenly
    strided elements (see the module docstring).
    """
    h = hashlib.sha256()
    tracked: set[int] = set()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    for layer in layers:
        h.update(layer.name.encode())
        for p in layer.module.parameters(recurse=False):
            if id(p) not in tracked:  # MoE experts of one 3-D parameter: hashed once
                tracked.add(id(p))
                h.update(_bytes(p))
    for name, p in model.named_parameters():
        if id(p) not in tracked:
            flat = p.detach().reshape(-1)  # (numel,)
            step = max(1, flat.numel() // SAMPLE)
            h.update(name.encode())
            h.update(_bytes(flat[::step][:SAMPLE]))
    return h.hexdigest()[:16]


def data_fingerprint(data: EncodedDataset) -> str:
    """The dataset's fingerprint (see :meth:`EncodedDataset.fingerprint`)."""
    return data.fingerprint()


def operator_fingerprint(operator) -> str:
    """A short hex digest of a fitted curvature operator (its kind, damping and tensors)."""
    h = hashlib.sha256(f"{operator.name}:{sorted(operator.damping.items())};".encode())
    for key, t in sorted(operator.tensors().items()):
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
