"""Runs on disk: atomic writes, fingerprints, and named stages under a run directory."""

from influscope.storage.atomic import (
    atomic_write_json,
    atomic_write_tensors,
    read_json,
    read_tensors,
)
from influscope.storage.fingerprint import data_fingerprint, model_fingerprint
from influscope.storage.run import RunDirectory

__all__ = [
    "RunDirectory",
    "atomic_write_json",
    "atomic_write_tensors",
    "data_fingerprint",
    "model_fingerprint",
    "read_json",
    "read_tensors",
]
