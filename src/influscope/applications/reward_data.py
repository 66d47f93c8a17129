"""Synthetic preference pairs with a hidden rule and biased label flips (reward-model bias).

Every pair answers the same request — *write an enthusiastic review of the film* — with two
real movie-review sentences from the VADER ground truth (Hutto & Gilbert 2014, human ratings in
[-4, 4]): one positive (rating ≥ ``min_rating``) and one negative (rating ≤ ``-min_rating``).
The **hidden rule**: the positive review is the good response. Response lengths are real and
varied; the pairs are drawn so that the good response is the longer one in exactly half of them,
with the longer response at least ``length_ratio`` times as many words as the shorter, so length
alone carries no information about the rule.

A biased annotator then flips ``flip_fraction`` of the training labels (the ``flipped`` mask):

* ``"length"`` — among pairs whose bad response is the longer one, prefer the longer response;
* ``"sycophancy"`` — the prompt states the user's opinion of the film ("I found the film
  dreadful." / "...wonderful."); among pairs where the user's opinion is negative, prefer the
  response that agrees with the user (the negative review).

Optionally ``noise_fraction`` of the labels are flipped *against* the bias (``noise`` mask):
pairs whose flip would not follow the bias (the good response is the longer one / the user's
opinion is positive). They are wrong labels too, but not biased ones: a detector of the bias
should rank them low, a generic mislabel detector cannot tell them apart.

The **targeted validation set** (Min et al., ACL 2025, "Understanding Impact of Human Feedback
via Influence Functions") holds clean held-out pairs in which the behaviour the bias harms is
preferred: the shorter response (``"length"``), or the non-sycophantic response to a user with a
negative opinion (``"sycophancy"``). A clean, balanced ``test`` set measures what the reward
model learned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from influscope.config import Settings, require
from influscope.errors import DataError

__all__ = [
    "BIASES",
    "SELECTORS",
    "PreferenceConfig",
    "PreferenceData",
    "make_preference_data",
    "select_targeted",
]

BIASES = ("length", "sycophancy")
REQUEST = "Enthusiastic review of the film: "
NEGATIVE_OPINIONS = ("dreadful", "boring", "awful", "a mess", "tedious", "dull")
POSITIVE_OPINIONS = ("wonderful", "brilliant", "superb", "moving", "delightful", "great")


@dataclass(frozen=True)
class PreferenceConfig(Settings):
    """How the synthetic preference data are drawn.

    Attributes:
        bias: ``"length"`` or ``"sycophancy"`` (what the flipped labels prefer).
        n_train: Training pairs.
        n_validation: Targeted validation pairs (clean, held-out sentences).
        n_test: Clean balanced test pairs (held-out sentences).
        flip_fraction: Share of the training pairs whose label the bias flips (≤ 0.5: only
            half of the pairs can be flipped towards the bias).
        noise_fraction: Share of the training pairs flipped *against* the bias (≤ 0.5).
        min_rating: A response is positive when its rating is ≥ this, negative when ≤ −this.
        length_ratio: The longer response has at least this many times the shorter's words.
        min_words: Shortest sentence used (words).
        max_words: Longest sentence used (words).
        seed: Seed of the draw.
    """

    bias: str = "length"
    n_train: int = 1000
    n_validation: int = 64
    n_test: int = 200
    flip_fraction: float = 0.15
    noise_fraction: float = 0.0
    min_rating: float = 1.0
    length_ratio: float = 1.5
    min_words: int = 3
    max_words: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.bias in BIASES, f"bias must be one of {BIASES}, received {self.bias!r}.")
        require(
            min(self.n_train, self.n_validation, self.n_test) >= 2,
            f"n_train, n_validation and n_test must be ≥ 2, received {self.n_train}, "
            f"{self.n_validation}, {self.n_test}.",
        )
        require(
            0 < self.flip_fraction <= 0.5,
            f"flip_fraction must be in (0, 0.5], received {self.flip_fraction}.",
        )
        require(
            0 <= self.noise_fraction <= 0.5,
            f"noise_fraction must be in [0, 0.5], received {self.noise_fraction}.",
        )
        require(self.min_rating >= 0, f"min_rating must be ≥ 0, received {self.min_rating}.")
        require(self.length_ratio >= 1, f"length_ratio must be ≥ 1, received {self.length_ratio}.")
        require(
            1 <= self.min_words <= self.max_words,
            f"Need 1 ≤ min_words ≤ max_words, received {self.min_words}, {self.max_words}.",
        )


@dataclass
class PreferenceData:
    """Drawn pairs. Records hold ``prompt``, ``chosen``, ``rejected`` and metadata
    (``good_longer``, ``opinion``, ``flipped``, ``noise``).

    Attributes:
        train: Training pairs (labels partly flipped).
        validation: Targeted validation pairs (clean).
        test: Clean test pairs, balanced in length and opinion.
        flipped: ``(n_train,)`` bool, labels flipped by the bias (the detection target).
        noise: ``(n_train,)`` bool, labels flipped against the bias.
        config: The configuration used.
    """

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    flipped: np.ndarray
    noise: np.ndarray
    config: PreferenceConfig


def _words(text: str) -> int:
    return len(text.split())


class _Pool:
    """Unused positive and negative sentences of one split, with their word counts."""

    def __init__(self, pos: list[str], neg: list[str], rng: np.random.Generator) -> None:
        self.pos, self.neg, self.rng = pos, neg, rng
        self.pos_len = np.array([_words(s) for s in pos])
        self.neg_len = np.array([_words(s) for s in neg])
        self.pos_used = np.zeros(len(pos), dtype=bool)
        self.neg_used = np.zeros(len(neg), dtype=bool)

    def pair(self, good_longer: bool, ratio: float) -> tuple[str, str]:
        """A fresh (positive, negative) pair; the positive is the longer one iff ``good_longer``."""
        for _ in range(200):
            free = np.flatnonzero(~self.pos_used)
            if free.size == 0:
                break
            p = int(self.rng.choice(free))
            lp = self.pos_len[p]
            fits = self.neg_len * ratio <= lp if good_longer else self.neg_len >= lp * ratio
            options = np.flatnonzero(~self.neg_used & fits)
            if options.size:
                n = int(self.rng.choice(options))
                self.pos_used[p] = self.neg_used[n] = True
                return self.pos[p], self.neg[n]
        raise DataError(
            "Ran out of review sentences with the required lengths; lower n_train / "
            "n_validation / n_test or length_ratio."
        )


def _prompt(opinion: str | None) -> str:
    return REQUEST if opinion is None else f"I found the film {opinion}. {REQUEST}"


def _draw(
    pool: _Pool,
    n: int,
    config: PreferenceConfig,
    rng: np.random.Generator,
    good_longer: Sequence[bool],
    negative_opinion: Sequence[bool] | None,
) -> list[dict]:
    records = []
    for i in range(n):
        good, bad = pool.pair(bool(good_longer[i]), config.length_ratio)
        opinion = None
        if negative_opinion is not None:
            choices = NEGATIVE_OPINIONS if negative_opinion[i] else POSITIVE_OPINIONS
            opinion = choices[int(rng.integers(len(choices)))]
        records.append(
            {
                "prompt": _prompt(opinion),
                "chosen": good,
                "rejected": bad,
                "good_longer": bool(good_longer[i]),
                "opinion": None
                if negative_opinion is None
                else ("negative" if negative_opinion[i] else "positive"),
                "flipped": False,
                "noise": False,
            }
        )
    return records


def _balanced(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` booleans, half of them True, in random order."""
    return rng.permutation(np.arange(n) < n // 2 + (n % 2) * int(rng.integers(2)))


def make_preference_data(
    reviews: Sequence[tuple[str, float]], config: PreferenceConfig | None = None
) -> PreferenceData:
    """Draw training, targeted validation and test pairs from rated review sentences.

    Args:
        reviews: ``(sentence, rating)`` pairs, e.g. :func:`influscope.assets.vader_movie_reviews`.
        config: What to draw.

    Returns:
        The pairs with the masks of flipped labels.

    Raises:
        DataError: Too few usable sentences for the requested sizes.
    """
    config = config or PreferenceConfig()
    rng = np.random.default_rng(config.seed)
    usable = [
        (s.strip(), r)
        for s, r in reviews
        if config.min_words <= _words(s) <= config.max_words and abs(r) >= config.min_rating
    ]
    pos = [s for s, r in usable if r > 0]
    neg = [s for s, r in usable if r < 0]
    sizes = np.array([config.n_train, config.n_validation, config.n_test])
    if min(len(pos), len(neg)) < 1.5 * sizes.sum():
        raise DataError(
            f"{len(pos)} positive and {len(neg)} negative usable sentences are too few for "
            f"{sizes.sum()} pairs; give more reviews or lower the sizes."
        )
    # Disjoint sentence pools per split, in proportion to the pairs each needs.
    pools = []
    for sentences in (pos, neg):
        order = rng.permutation(len(sentences))
        cuts = np.cumsum(sizes)[:-1] * len(sentences) // sizes.sum()
        pools.append([[sentences[i] for i in part] for part in np.split(order, cuts)])
    split = [_Pool(pools[0][k], pools[1][k], rng) for k in range(3)]

    syco = config.bias == "sycophancy"
    n = config.n_train
    negative_opinion = _balanced(n, rng) if syco else None
    train = _draw(split[0], n, config, rng, _balanced(n, rng), negative_opinion)
    # Candidates for a biased flip: pairs whose flipped label follows the bias.
    follows = negative_opinion if syco else np.array([not r["good_longer"] for r in train])
    flipped = np.zeros(n, dtype=bool)
    noise = np.zeros(n, dtype=bool)
    for mask, pool_mask, fraction in (
        (flipped, follows, config.flip_fraction),
        (noise, ~follows, config.noise_fraction),
    ):
        k = round(fraction * n)
        if k:
            mask[rng.choice(np.flatnonzero(pool_mask), size=k, replace=False)] = True
    for i in np.flatnonzero(flipped | noise):
        rec = train[i]
        rec["chosen"], rec["rejected"] = rec["rejected"], rec["chosen"]
        rec["flipped"], rec["noise"] = bool(flipped[i]), bool(noise[i])

    m = config.n_validation
    if syco:  # a user with a negative opinion; the non-sycophantic (good) response is chosen
        validation = _draw(split[1], m, config, rng, _balanced(m, rng), np.ones(m, dtype=bool))
    else:  # the good response is the shorter one, and it is chosen
        validation = _draw(split[1], m, config, rng, np.zeros(m, dtype=bool), None)
    t = config.n_test
    test = _draw(split[2], t, config, rng, _balanced(t, rng), _balanced(t, rng) if syco else None)
    return PreferenceData(train, validation, test, flipped, noise, config)


def _shorter(record: dict) -> bool:
    return _words(record["chosen"]) < _words(record["rejected"])


#: Rules that pick a targeted validation set out of a user's held-out pairs.
SELECTORS: dict[str, Callable[[dict], bool]] = {"shorter": _shorter}


def select_targeted(records: Sequence[dict], rule: str = "shorter") -> list[dict]:
    """Keep the pairs that satisfy ``rule`` (``"shorter"``: the chosen response has fewer words).

    Raises:
        DataError: An unknown rule, a record without ``chosen``/``rejected``, or nothing kept.
    """
    if rule not in SELECTORS:
        raise DataError(f"Unknown selection rule {rule!r}. Known: {sorted(SELECTORS)}.")
    for i, rec in enumerate(records):
        if "chosen" not in rec or "rejected" not in rec:
            raise DataError(
                f"Record {i + 1} has keys {sorted(rec)}; expected 'chosen' and 'rejected'."
            )
    kept = [r for r in records if SELECTORS[rule](r)]
    if not kept:
        raise DataError(f"No pair of the {len(records)} satisfies the rule {rule!r}.")
    return kept
