"""Synthetic planted facts about invented entities: the ground truth of the demo.

A planted fact links an invented entity to an invented answer through a relation ("The capital of
Velmora is Tarisk."). The names are pronounceable syllable strings drawn from a seeded generator
and checked against a vocabulary (e.g. every word of the Shakespeare texts), so the only evidence
for a fact in the training corpus is its own planted sentences. That is what makes them a test of
influence functions: the training sequences that state a fact should be the top-influence sequences
for the query that asks for it (Grosse et al. 2023, §5; DESIGN.md §6.4).

Each fact is written as ``k`` differently-worded training sentences (:func:`make_training_records`)
and asked by one held-out query (:func:`make_queries`), in English, French, German or Spanish, in
either word order (see :mod:`influscope.demo.templates`)::

    >>> facts = make_facts(2, seed=0)
    >>> records = make_training_records(facts, langs=("en", "fr"), k=3)
    >>> len(records)
    12
    >>> query = make_queries(facts)[0]
    >>> query["completion"] == f" {facts[0].answer}."
    True
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from influscope.demo.templates import LANGUAGES, ORDERS, RELATIONS, TEMPLATES
from influscope.errors import ConfigError

__all__ = [
    "PlantedFact",
    "make_facts",
    "make_queries",
    "make_training_records",
    "template_vocabulary",
]

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_ONSETS += ("br", "dr", "gr", "kr", "tr", "st", "sk", "vr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
# kind -> (syllables before the ending, endings); an ending that starts with a vowel gets an onset.
_SHAPES: dict[str, tuple[int, tuple[str, ...]]] = {
    "country": (2, ("ia", "ora", "ara", "eth", "und", "avia")),
    "city": (2, ("sk", "rn", "n", "k", "th", "m", "rd", "l", "st")),
    "river": (2, ("a", "e", "in", "el", "ey")),
    "first": (2, ("", "n", "r", "l", "s")),
    "last": (1, ("ll", "sk", "nd", "rt", "m", "ck")),
}


@dataclass(frozen=True)
class PlantedFact:
    """One fact: ``relation(entity) = answer``.

    Attributes:
        entity: Invented subject, e.g. ``"Velmora"`` (a person is ``"First Last"``).
        relation: One of :data:`~influscope.demo.templates.RELATIONS`.
        answer: Invented object, e.g. ``"Tarisk"``.
        fact_id: Stable identifier, ``"fact-0000"``, ``"fact-0001"``, …
    """

    entity: str
    relation: str
    answer: str
    fact_id: str

    def fill(self, template: str) -> str:
        """Substitute ``{e}`` and ``{a}`` in a template."""
        return template.format(e=self.entity, a=self.answer)


def template_vocabulary() -> set[str]:
    """Return every lower-cased word used by the templates (names must avoid them)."""
    words: set[str] = set()
    for langs in TEMPLATES.values():
        for orders in langs.values():
            for tpl in orders.values():
                for text in (*tpl.train, tpl.query):
                    words.update(re.findall(r"[^\W\d_]+", text.lower()))
    return words


class _NameGenerator:
    """Draws unique pronounceable names that avoid a vocabulary and each other."""

    def __init__(self, rng: random.Random, forbidden: Collection[str]) -> None:
        self._rng = rng
        self._forbidden = {w.lower() for w in forbidden} | template_vocabulary()
        self._used: list[str] = []

    def _draw(self, kind: str) -> str:
        n_syllables, endings = _SHAPES[kind]
        rng = self._rng
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syllables))
        ending = rng.choice(endings)
        if ending and ending[0] in "aeiou":
            ending = rng.choice(_ONSETS[:14]) + ending
        return (word + ending).capitalize()

    def _ok(self, word: str) -> bool:
        low = word.lower()
        if len(low) < 4 or low in self._forbidden:
            return False
        return not any(low in used or used in low for used in self._used)

    def word(self, kind: str) -> str:
        for _ in range(10_000):
            word = self._draw(kind)
            if self._ok(word):
                self._used.append(word.lower())
                return word
        raise ConfigError(
            f"Could not draw a new {kind} name; ask for fewer facts."
        )  # pragma: no cover

    def name(self, kind: str) -> str:
        if kind == "person":
            return f"{self.word('first')} {self.word('last')}"
        return self.word(kind)


def make_facts(
    n: int,
    seed: int = 0,
    *,
    relations: Sequence[str] | None = None,
    forbidden: Collection[str] = (),
) -> list[PlantedFact]:
    """Generate ``n`` planted facts with invented, pairwise distinct names.

    Relations cycle through ``relations`` (default: all of
    :data:`~influscope.demo.templates.RELATIONS`), so every relation gets ``n / len(relations)``
    facts. No name is a substring of another, and none is in ``forbidden`` (compared in lower case)
    or in the template vocabulary.

    Args:
        n: Number of facts (at least 1).
        seed: Seed of the name generator; the same seed gives the same facts.
        relations: Relations to use.
        forbidden: Words names must avoid, e.g. the vocabulary of the rest of the corpus.

    Returns:
        The facts, ``fact_id`` ``"fact-0000"`` … in order.

    Raises:
        ConfigError: ``n < 1`` or an unknown relation.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}.")
    relations = tuple(relations or RELATIONS)
    for relation in relations:
        _check("relation", relation, tuple(RELATIONS))
    names = _NameGenerator(random.Random(seed), forbidden)
    facts = []
    for i in range(n):
        relation = relations[i % len(relations)]
        entity_kind, answer_kind = RELATIONS[relation]
        entity, answer = names.name(entity_kind), names.name(answer_kind)
        facts.append(PlantedFact(entity, relation, answer, f"fact-{i:04d}"))
    return facts


def _check(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        known = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"Invalid {what}: {value!r}. Supported: ({known}).")


def make_training_records(
    facts: Iterable[PlantedFact],
    langs: Sequence[str] = ("en",),
    k: int = 3,
    order: str = "forward",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Write each fact as ``k`` differently-worded training sentences per language.

    Args:
        facts: The facts.
        langs: Languages, any of :data:`~influscope.demo.templates.LANGUAGES`.
        k: Sentences per fact and language, 1–3 (distinct templates; with ``k < 3`` the seed
            picks which).
        order: ``"forward"`` (entity before answer) or ``"reversed"`` (answer before entity).
        seed: Seed of the template choice.

    Returns:
        Records ``{"text", "fact_id", "lang", "order", "relation", "template"}`` in the order
        fact, language, template (``template`` is the index of the template used).

    Raises:
        ConfigError: Unknown language or order, or ``k`` out of range.
    """
    _check("order", order, ORDERS)
    for lang in langs:
        _check("language", lang, LANGUAGES)
    rng = random.Random(seed)
    records = []
    for fact in facts:
        for lang in langs:
            train = TEMPLATES[fact.relation][lang][order].train
            if not 1 <= k <= len(train):
                raise ConfigError(f"k must be between 1 and {len(train)}, got {k}.")
            chosen = sorted(rng.sample(range(len(train)), k)) if k < len(train) else range(k)
            for index in chosen:
                records.append(
                    {
                        "text": fact.fill(train[index]),
                        "fact_id": fact.fact_id,
                        "lang": lang,
                        "order": order,
                        "relation": fact.relation,
                        "template": index,
                    }
                )
    return records


def make_queries(
    facts: Iterable[PlantedFact], lang: str = "en", order: str = "forward"
) -> list[dict[str, Any]]:
    """Ask for each fact with the held-out query template.

    In ``"forward"`` order the prompt names the entity and the completion is ``" <answer>."``; in
    ``"reversed"`` order the prompt names the answer and ends right before the entity, so the
    completion is ``" <entity>."``.

    Returns:
        Records ``{"prompt", "completion", "fact_id", "lang", "order", "relation"}``.

    Raises:
        ConfigError: Unknown language or order.
    """
    _check("order", order, ORDERS)
    _check("language", lang, LANGUAGES)
    queries = []
    for fact in facts:
        target = fact.answer if order == "forward" else fact.entity
        queries.append(
            {
                "prompt": fact.fill(TEMPLATES[fact.relation][lang][order].query),
                "completion": f" {target}.",
                "fact_id": fact.fact_id,
                "lang": lang,
                "order": order,
                "relation": fact.relation,
            }
        )
    return queries
