"""Fingerprints that tie a stored stage to the model and data it was computed from.

* model: SHA-256 over every parameter's name and shape, plus the bytes of the tracked layers'
  weights (so a fine-tuned copy of the same architecture gets a different fingerprint);
* data: :meth:`EncodedDataset.fingerprint` (token ids, masks, global indices).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from influscope.modules.selection import TrackedLayer
from influscope.tasks.data import EncodedDataset


def model_fingerprint(model: nn.Module, layers: Sequence[TrackedLayer]) -> str:
    """A short hex digest of the architecture and the tracked weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    for layer in layers:
        h.update(layer.name.encode())
        for p in layer.module.parameters(recurse=False):
            t = p.detach().to("cpu").contiguous()
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
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
