"""Synthetic planted facts about invented entities: the ground truth of the demo.

A planted fact links an invented entity to an invented answer through a relation ("The capital of
Velmora is Tarisk."). The names are pronounceable syllable strings drawn from a seeded generator
and checked against a vocabulary (e.g. every word of the Shakespeare texts), so the only evidence
for a fact in the training corpus is its own planted sentences. That is what makes them a test of
influence functions: the training sequences that state a fact should be the top-influence sequences
for the query that asks for it (Grosse et al. 2023, §5; DESIGN.md §6.4).

Each fact is written as ``k`` training sequences — a short lead-in sentence followed by one of
``k`` differently-worded templates (:func:`make_training_records`) — and asked by a query whose
prompt no training sequence contains (:func:`make_queries`), in English, French, German or
Spanish, in either word order (see :mod:`influscope.demo.templates`)::

    >>> facts = make_facts(2, seed=0)
    >>> records = make_training_records(facts, langs=("en", "fr"), k=3)
    >>> len(records)
    12
    >>> records[0]["text"]
    'Know this. The capital of Vedunund is Vudrak.'
    >>> query = make_queries(facts)[0]
    >>> query["prompt"]
    'Hear me. The capital of Vedunund is'
    >>> query["completion"] == f" {facts[0].answer}."
    True
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from influscope.demo.templates import LANGUAGES, LEAD_INS, ORDERS, RELATIONS, TEMPLATES
from influscope.errors import ConfigError

__all__ = [
    "QUERY_STYLES",
    "PlantedFact",
    "make_facts",
    "make_queries",
    "make_training_records",
    "template_vocabulary",
]

QUERY_STYLES: tuple[str, ...] = ("context", "paraphrase")

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
    for leads in LEAD_INS.values():
        for text in leads:
            words.update(re.findall(r"[^\W\d_]+", text.lower()))
    for langs in TEMPLATES.values():
        for orders in langs.values():
            for tpl in orders.values():
                for text in (*tpl.train, tpl.paraphrase):
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


def _plan(fact: PlantedFact, lang: str, order: str) -> list[int]:
    """A permutation of the lead-ins of ``lang``, fixed by the fact, the language and the order.

    Training sequence j of the fact uses lead-in ``plan[j]``; queries use ``plan[-1]``, which no
    training sequence of the fact has (``k`` is at most ``len(LEAD_INS[lang]) - 1``). The plan
    does not depend on a seed, so queries and training records always agree.
    """
    rng = random.Random(f"{fact.fact_id}:{fact.entity}:{lang}:{order}")
    return rng.sample(range(len(LEAD_INS[lang])), len(LEAD_INS[lang]))


def make_training_records(
    facts: Iterable[PlantedFact],
    langs: Sequence[str] = ("en",),
    k: int = 3,
    order: str = "forward",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Write each fact as ``k`` differently-worded training sequences per language.

    A sequence is a lead-in sentence from :data:`~influscope.demo.templates.LEAD_INS` followed
    by a template sentence, e.g. ``"Hear me. The capital of Velmora is Tarisk."``; the ``k``
    sequences of a fact use ``k`` distinct templates and ``k`` distinct lead-ins. The lead-ins put
    the fact at several positions and after several contexts, which a tiny model needs in order to
    recall it after a new one. With ``k < 3`` the template that :func:`make_queries` builds its
    ``"context"`` prompt from is always among the chosen ones.

    Args:
        facts: The facts.
        langs: Languages, any of :data:`~influscope.demo.templates.LANGUAGES`.
        k: Sequences per fact and language, 1–3.
        order: ``"forward"`` (entity before answer) or ``"reversed"`` (answer before entity).
        seed: Seed of the template choice when ``k < 3`` (lead-ins depend on the fact only).

    Returns:
        Records ``{"text", "fact_id", "lang", "order", "relation", "template"}`` in the order
        fact, language, template (``template`` is the index of the template used).

    Raises:
        ConfigError: Unknown language or order, or ``k`` out of range.
    """
    _check("order", order, ORDERS)
    for lang in langs:
        _check("language", lang, LANGUAGES)
    records = []
    for fact in facts:
        for lang in langs:
            templates = TEMPLATES[fact.relation][lang][order]
            if not 1 <= k <= len(templates.train):
                raise ConfigError(f"k must be between 1 and {len(templates.train)}, got {k}.")
            frame, _ = templates.query_frame(order)
            others = [i for i in range(len(templates.train)) if i != frame]
            plan = _plan(fact, lang, order)
            pick = random.Random(f"{seed}:{fact.fact_id}:{lang}:{order}:templates")
            chosen = sorted([frame, *pick.sample(others, k - 1)])
            for lead, index in zip(plan, chosen):
                text = f"{LEAD_INS[lang][lead]} {fact.fill(templates.train[index])}"
                records.append(
                    {
                        "text": text,
                        "fact_id": fact.fact_id,
                        "lang": lang,
                        "order": order,
                        "relation": fact.relation,
                        "template": index,
                    }
                )
    return records


def make_queries(
    facts: Iterable[PlantedFact],
    lang: str = "en",
    order: str = "forward",
    *,
    style: str = "context",
) -> list[dict[str, Any]]:
    """Ask for each fact with a prompt that no training sequence contains.

    In ``"forward"`` order the prompt names the entity and the completion is ``" <answer>."``; in
    ``"reversed"`` order the prompt names the answer and ends right before the entity, so the
    completion is ``" <entity>."``. The prompt starts with the fact's held-out lead-in (one that
    none of its training sequences has), followed by

    - ``style="context"``: the start of a training template, up to the target
      ("Know this. The capital of Velmora is") — the fact in a context it was not trained in;
    - ``style="paraphrase"``: a sentence worded unlike every training template
      ("Know this. Everyone knows that the capital of Velmora is") — a test of abstraction that a
      tiny model mostly fails.

    Args:
        facts: The facts.
        lang: Language of the prompt.
        order: Word order of the prompt.
        style: ``"context"`` or ``"paraphrase"``.

    Returns:
        Records ``{"prompt", "completion", "fact_id", "lang", "order", "relation", "style"}``.

    Raises:
        ConfigError: Unknown language, order or style.
    """
    _check("order", order, ORDERS)
    _check("language", lang, LANGUAGES)
    _check("style", style, QUERY_STYLES)
    queries = []
    for fact in facts:
        templates = TEMPLATES[fact.relation][lang][order]
        body = templates.query_frame(order)[1] if style == "context" else templates.paraphrase
        lead = LEAD_INS[lang][_plan(fact, lang, order)[-1]]
        target = fact.answer if order == "forward" else fact.entity
        queries.append(
            {
                "prompt": f"{lead} {fact.fill(body)}",
                "completion": f" {target}.",
                "fact_id": fact.fact_id,
                "lang": lang,
                "order": order,
                "relation": fact.relation,
                "style": style,
            }
        )
    return queries
