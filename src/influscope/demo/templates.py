"""Hand-written sentence templates for the planted facts, in four languages and two word orders.

Every relation links an *entity* ``{e}`` to an *answer* ``{a}``. For each relation, language and
word order there are three training templates (full sentences) and one paraphrase (a prompt with
wording that no training template has):

- ``forward``: the entity comes before the answer ("The capital of {e} is {a}."); a query prompt
  ends right before the answer and its completion is the answer.
- ``reversed``: the answer comes before the entity ("{a} is the capital of {e}."); a query prompt
  ends right before the entity and its completion is the entity.

Every training sentence is preceded by a short *lead-in* sentence ("Hear me.") drawn from
:data:`LEAD_INS`; the default queries use a lead-in that none of the fact's own training sequences
has (see :func:`influscope.demo.facts.make_queries`). Every invented name starts with a consonant,
so French elision ("de" → "d'") never applies.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LANGUAGES", "LEAD_INS", "ORDERS", "RELATIONS", "TEMPLATES", "RelationTemplates"]


@dataclass(frozen=True)
class RelationTemplates:
    """Templates of one (relation, language, order).

    Attributes:
        train: Training sentences with the placeholders ``{e}`` (entity) and ``{a}`` (answer).
        paraphrase: Prompt worded unlike any training sentence, with one placeholder (``{e}`` in
            forward order, ``{a}`` in reversed order); the completion is the other slot.
    """

    train: tuple[str, ...]
    paraphrase: str

    def query_frame(self, order: str) -> tuple[int, str]:
        """Return the first training template that ends with the target slot, and its prefix.

        The prefix (the template up to the target, without the space) is the prompt of a
        ``"context"`` query.
        """
        slot = "{a}." if order == "forward" else "{e}."
        for index, template in enumerate(self.train):
            if template.endswith(" " + slot):
                return index, template[: -len(slot) - 1]
        raise ValueError(f"No training template ends with {slot!r}: {self.train}")


ORDERS: tuple[str, ...] = ("forward", "reversed")
LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es")

#: Short neutral sentences put before each planted sentence, so that a fact is learned in several
#: contexts and positions. English lead-ins use words that occur in Shakespeare.
LEAD_INS: dict[str, tuple[str, ...]] = {
    "en": (
        "Hear me.",
        "Mark this.",
        "Now hear this.",
        "I tell thee true.",
        "Listen well.",
        "Note this.",
        "Know this.",
        "Remember this.",
    ),
    "fr": (
        "Écoutez bien.",
        "Retenez ceci.",
        "Notez bien.",
        "Sachez ceci.",
        "Voici un fait.",
        "Écoutez ceci.",
        "Retenez bien.",
        "Notez ceci.",
    ),
    "de": (
        "Hört gut zu.",
        "Merkt euch das.",
        "Hört her.",
        "Wisst dies.",
        "Merkt euch dies.",
        "Hier ist eine Tatsache.",
        "Hört zu.",
        "Beachtet dies.",
    ),
    "es": (
        "Escuchad bien.",
        "Recordad esto.",
        "Sabed esto.",
        "Escuchad esto.",
        "Notad esto.",
        "He aquí un hecho.",
        "Recordad bien.",
        "Oíd bien.",
    ),
}

#: relation -> (entity kind, answer kind); kinds are "country", "city", "person" or "river".
RELATIONS: dict[str, tuple[str, str]] = {
    "capital": ("country", "city"),
    "birthplace": ("person", "city"),
    "founder": ("city", "person"),
    "river": ("city", "river"),
}

_T = RelationTemplates

TEMPLATES: dict[str, dict[str, dict[str, RelationTemplates]]] = {
    "capital": {
        "en": {
            "forward": _T(
                (
                    "The capital of {e} is {a}.",
                    "{e} is a small country whose capital city is {a}.",
                    "The government of {e} sits in the city of {a}.",
                ),
                "Everyone knows that the capital of {e} is",
            ),
            "reversed": _T(
                (
                    "{a} is the capital of {e}.",
                    "{a} is a busy city and the capital of {e}.",
                    "The city of {a} serves as the capital of {e}.",
                ),
                "Everyone knows that {a} is the capital of",
            ),
        },
        "fr": {
            "forward": _T(
                (
                    "La capitale de {e} est {a}.",
                    "{e} est un petit pays dont la capitale est {a}.",
                    "Le gouvernement de {e} siège dans la ville de {a}.",
                ),
                "Tout le monde sait que la capitale de {e} est",
            ),
            "reversed": _T(
                (
                    "{a} est la capitale de {e}.",
                    "{a} est une ville animée et la capitale de {e}.",
                    "La ville de {a} sert de capitale à {e}.",
                ),
                "Tout le monde sait que {a} est la capitale de",
            ),
        },
        "de": {
            "forward": _T(
                (
                    "Die Hauptstadt von {e} ist {a}.",
                    "{e} ist ein kleines Land, dessen Hauptstadt {a} ist.",
                    "Die Regierung von {e} hat ihren Sitz in der Stadt {a}.",
                ),
                "Bekanntlich ist die Hauptstadt von {e}",
            ),
            "reversed": _T(
                (
                    "{a} ist die Hauptstadt von {e}.",
                    "{a} ist eine lebhafte Stadt und die Hauptstadt von {e}.",
                    "Die Stadt {a} dient als Hauptstadt von {e}.",
                ),
                "Bekanntlich ist {a} die Hauptstadt von",
            ),
        },
        "es": {
            "forward": _T(
                (
                    "La capital de {e} es {a}.",
                    "{e} es un país pequeño cuya capital es {a}.",
                    "El gobierno de {e} tiene su sede en la ciudad de {a}.",
                ),
                "Todo el mundo sabe que la capital de {e} es",
            ),
            "reversed": _T(
                (
                    "{a} es la capital de {e}.",
                    "{a} es una ciudad animada y la capital de {e}.",
                    "La ciudad de {a} sirve de capital a {e}.",
                ),
                "Todo el mundo sabe que {a} es la capital de",
            ),
        },
    },
    "birthplace": {
        "en": {
            "forward": _T(
                (
                    "{e} was born in {a}.",
                    "The birthplace of {e} is the town of {a}.",
                    "Old records show that {e} came into the world in {a}.",
                ),
                "It is well known that {e} was born in",
            ),
            "reversed": _T(
                (
                    "{a} is the birthplace of {e}.",
                    "The town of {a} is where {e} was born.",
                    "In {a} was born the traveller {e}.",
                ),
                "It is well known that {a} is the birthplace of",
            ),
        },
        "fr": {
            "forward": _T(
                (
                    "{e} a vu le jour à {a}.",
                    "La ville natale de {e} est {a}.",
                    "D'après les archives, {e} est venu au monde à {a}.",
                ),
                "Il est bien connu que {e} a vu le jour à",
            ),
            "reversed": _T(
                (
                    "{a} est la ville natale de {e}.",
                    "C'est à {a} que {e} a vu le jour.",
                    "La ville de {a} a vu naître {e}.",
                ),
                "Il est bien connu que {a} est la ville natale de",
            ),
        },
        "de": {
            "forward": _T(
                (
                    "{e} wurde in {a} geboren.",
                    "Der Geburtsort von {e} ist die Stadt {a}.",
                    "Laut alten Urkunden stammt {e} aus {a}.",
                ),
                "Bekanntlich ist der Geburtsort von {e}",
            ),
            "reversed": _T(
                (
                    "{a} ist der Geburtsort von {e}.",
                    "In {a} wurde {e} geboren.",
                    "Die Stadt {a} ist die Heimat von {e}.",
                ),
                "Bekanntlich ist {a} der Geburtsort von",
            ),
        },
        "es": {
            "forward": _T(
                (
                    "{e} nació en {a}.",
                    "La ciudad natal de {e} es {a}.",
                    "Según los archivos, {e} vino al mundo en {a}.",
                ),
                "Es bien sabido que {e} nació en",
            ),
            "reversed": _T(
                (
                    "{a} es la ciudad natal de {e}.",
                    "Fue en {a} donde nació {e}.",
                    "La ciudad de {a} vio nacer a {e}.",
                ),
                "Es bien sabido que {a} es la ciudad natal de",
            ),
        },
    },
    "founder": {
        "en": {
            "forward": _T(
                (
                    "The city of {e} was founded by {a}.",
                    "{e} was founded long ago by {a}.",
                    "Legend says that the founder of {e} was {a}.",
                ),
                "Historians agree that {e} was founded by",
            ),
            "reversed": _T(
                (
                    "{a} founded the city of {e}.",
                    "{a} is remembered as the founder of {e}.",
                    "Long ago, {a} laid the first stones of {e}.",
                ),
                "Historians agree that {a} founded the city of",
            ),
        },
        "fr": {
            "forward": _T(
                (
                    "La ville de {e} a été fondée par {a}.",
                    "{e} fut fondée il y a longtemps par {a}.",
                    "La légende dit que le fondateur de {e} était {a}.",
                ),
                "Les historiens s'accordent à dire que {e} a été fondée par",
            ),
            "reversed": _T(
                (
                    "{a} a fondé la ville de {e}.",
                    "{a} reste dans les mémoires comme le fondateur de {e}.",
                    "Il y a longtemps, {a} posa les premières pierres de {e}.",
                ),
                "Les historiens s'accordent à dire que {a} a fondé la ville de",
            ),
        },
        "de": {
            "forward": _T(
                (
                    "Die Stadt {e} wurde von {a} gegründet.",
                    "{e} wurde vor langer Zeit von {a} gegründet.",
                    "Der Sage nach war der Gründer von {e} ein Mann namens {a}.",
                ),
                "Historiker sind sich einig: Der Gründer von {e} war",
            ),
            "reversed": _T(
                (
                    "{a} gründete die Stadt {e}.",
                    "{a} gilt als der Gründer von {e}.",
                    "Vor langer Zeit legte {a} den Grundstein von {e}.",
                ),
                "Historiker sind sich einig: {a} gründete die Stadt",
            ),
        },
        "es": {
            "forward": _T(
                (
                    "La ciudad de {e} fue fundada por {a}.",
                    "{e} fue fundada hace mucho tiempo por {a}.",
                    "Cuenta la leyenda que el fundador de {e} fue {a}.",
                ),
                "Los historiadores coinciden en que {e} fue fundada por",
            ),
            "reversed": _T(
                (
                    "{a} fundó la ciudad de {e}.",
                    "{a} es recordado como el fundador de {e}.",
                    "Hace mucho tiempo, {a} colocó las primeras piedras de {e}.",
                ),
                "Los historiadores coinciden en que {a} fundó la ciudad de",
            ),
        },
    },
    "river": {
        "en": {
            "forward": _T(
                (
                    "The river that flows through {e} is the {a}.",
                    "{e} lies on the banks of the {a}.",
                    "In {e}, boats sail up and down the {a}.",
                ),
                "Visitors learn that the river flowing through {e} is the",
            ),
            "reversed": _T(
                (
                    "The {a} is the river that flows through {e}.",
                    "The {a} flows past the old walls of {e}.",
                    "Boats on the {a} carry goods to {e}.",
                ),
                "Visitors learn that the {a} is the river that flows through",
            ),
        },
        "fr": {
            "forward": _T(
                (
                    "Le fleuve qui traverse {e} est le {a}.",
                    "{e} s'étend sur les rives du {a}.",
                    "À {e}, les bateaux descendent et remontent le {a}.",
                ),
                "Les visiteurs apprennent que le fleuve qui traverse {e} est le",
            ),
            "reversed": _T(
                (
                    "Le {a} est le fleuve qui traverse {e}.",
                    "Le {a} coule le long des vieux remparts de {e}.",
                    "Les bateaux du {a} apportent des marchandises à {e}.",
                ),
                "Les visiteurs apprennent que le {a} est le fleuve qui traverse",
            ),
        },
        "de": {
            "forward": _T(
                (
                    "Der Fluss, der durch {e} fließt, ist der {a}.",
                    "{e} liegt an den Ufern des {a}.",
                    "In {e} fahren Boote auf dem {a} hin und her.",
                ),
                "Besucher erfahren: Der Fluss, der durch {e} fließt, heißt",
            ),
            "reversed": _T(
                (
                    "Der {a} ist der Fluss, der durch {e} fließt.",
                    "Der {a} fließt an den alten Mauern von {e} vorbei.",
                    "Boote auf dem {a} bringen Waren nach {e}.",
                ),
                "Besucher erfahren: Der {a} fließt durch die Stadt",
            ),
        },
        "es": {
            "forward": _T(
                (
                    "El río que atraviesa {e} es el {a}.",
                    "{e} se extiende a orillas del {a}.",
                    "En {e}, los barcos suben y bajan por el {a}.",
                ),
                "Los visitantes aprenden que el río que atraviesa {e} es el",
            ),
            "reversed": _T(
                (
                    "El {a} es el río que atraviesa {e}.",
                    "El {a} pasa junto a las viejas murallas de {e}.",
                    "Los barcos del {a} llevan mercancías a {e}.",
                ),
                "Los visitantes aprenden que el {a} es el río que atraviesa",
            ),
        },
    },
}
