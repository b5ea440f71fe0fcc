"""Shared plumbing for the demo-data generator: seeded RNG streams, train/eval pools, the QA record,
text helpers."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from minimind.demo_data import tables as T

Lang = Literal["en", "zh"]
LANGS: tuple[Lang, Lang] = ("en", "zh")
Message = dict[str, str]

# Operands for the arithmetic data: addition/subtraction use 0..ADD_MAX, multiplication 0..MUL_MAX.
ADD_MAX = 99
MUL_MAX = 9
# How much of each table (and of the operand pairs) `make_pools` holds out for the eval files.
HELD_OUT = {"countries": 10, "elements": 8, "animals": 7, "words": 16, "sum_pairs": 300, "product_pairs": 8}


def make_rng(seed: int, stream: str) -> random.Random:
    """An independent RNG for one named stream.

    Seeding with a string goes through SHA-512 inside `random`, so it is stable across runs and
    platforms (unlike `hash()`); one stream per output file means editing one file's generator
    leaves every other file byte-identical.
    """
    return random.Random(f"minimind-demo:{seed}:{stream}")


def cap(text: str) -> str:
    """Upper-case the first character (English sentences built from lower-case table fields)."""
    return text[:1].upper() + text[1:]


def article(noun: str) -> str:
    """`noun` with "a" or "an" in front (good enough for the nouns in our tables)."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def lang_of(index: int) -> Lang:
    """Alternate languages by index: exactly half of every file is English, even at tiny scales."""
    return LANGS[index % 2]


def scaled(count: int, scale: float, minimum: int = 4) -> int:
    """`count * scale`, rounded, but never below `minimum` (every file keeps both languages)."""
    return max(minimum, round(count * scale))


class ArithPool:
    """Draws operand pairs for one side of the arithmetic train/eval split.

    The split is on *unordered* operand pairs: when {12, 35} is held out, none of 12+35, 35+12, 35-12
    (or 12*35 style products) appears in any training file, pretraining text included, so the eval
    measures whether the model learned to add rather than whether it memorised the sum.
    """

    def __init__(self, held: tuple[tuple[int, int], ...], held_mul: tuple[tuple[int, int], ...], train: bool):
        self.held = held
        self.held_mul = held_mul
        self.train = train
        self._held_set = frozenset(held) | frozenset(held_mul)

    def ok(self, a: int, b: int) -> bool:
        """True if the unordered pair {a, b} belongs to this side of the split."""
        return ((min(a, b), max(a, b)) in self._held_set) != self.train

    def draw(self, rng: random.Random, op: str) -> tuple[int, int]:
        """Operands for `op` ("+", "-" or "*"); for "-" the first operand is never the smaller one."""
        if self.train:
            hi = MUL_MAX if op == "*" else ADD_MAX
            while True:
                a, b = rng.randint(0, hi), rng.randint(0, hi)
                if self.ok(a, b):
                    break
        else:
            a, b = rng.choice(self.held_mul if op == "*" else self.held)
            if rng.random() < 0.5:
                a, b = b, a
        if op == "-" and a < b:
            a, b = b, a
        return a, b


@dataclass(frozen=True)
class Pools:
    """The table entries one side (train or eval) of the post-training data may ask about.

    Pretraining prose uses *all* entries; the eval entries are simply never asked about in
    sft/dpo/rlaif/reasoning training files, so answering them needs knowledge from pretraining.
    """

    train: bool
    countries: tuple[T.Country, ...]
    elements: tuple[T.Element, ...]
    animals: tuple[T.Animal, ...]
    words: tuple[tuple[str, str], ...]
    arith: ArithPool


def _split(rng: random.Random, items: tuple, n_eval: int) -> tuple[tuple, tuple]:
    """Deterministically pick `n_eval` items for eval; both halves keep the table's order."""
    chosen = set(rng.sample(range(len(items)), n_eval))
    train = tuple(x for i, x in enumerate(items) if i not in chosen)
    held = tuple(x for i, x in enumerate(items) if i in chosen)
    return train, held


def make_pools(seed: int) -> tuple[Pools, Pools]:
    """The (train, eval) pools for `seed`."""
    rng = make_rng(seed, "split")
    c_train, c_eval = _split(rng, T.COUNTRIES, HELD_OUT["countries"])
    e_train, e_eval = _split(rng, T.ELEMENTS, HELD_OUT["elements"])
    a_train, a_eval = _split(rng, T.ANIMALS, HELD_OUT["animals"])
    # Unique words only (a word repeated in the table must not land on both sides).
    words = tuple(dict.fromkeys(T.WORDS))
    w_train, w_eval = _split(rng, words, HELD_OUT["words"])
    # Held-out sums use a two-digit operand and no 0/1 operand, which would make them trivial.
    pairs = tuple((a, b) for a in range(2, ADD_MAX + 1) for b in range(max(a, 10), ADD_MAX + 1))
    held = tuple(sorted(rng.sample(pairs, HELD_OUT["sum_pairs"])))
    mul_pairs = tuple((a, b) for a in range(2, MUL_MAX + 1) for b in range(a, MUL_MAX + 1))
    held_mul = tuple(sorted(rng.sample(mul_pairs, HELD_OUT["product_pairs"])))
    train = Pools(True, c_train, e_train, a_train, w_train, ArithPool(held, held_mul, train=True))
    evals = Pools(False, c_eval, e_eval, a_eval, w_eval, ArithPool(held, held_mul, train=False))
    return train, evals


@dataclass(frozen=True)
class QA:
    """One question with a correct reply, its short exact answer, and a same-template wrong reply."""

    kind: str
    lang: Lang
    question: str
    reply: str
    answer: str
    wrong: str


Builder = Callable[[random.Random, Lang, Pools], QA]


def make_qa(kind: str, lang: Lang, question: str, reply: Callable[[str], str], answer: str, wrong: str) -> QA:
    """Assemble a QA, rendering the reply template with the right and the wrong answer."""
    if lang == "en":
        return QA(kind, lang, cap(question), cap(reply(answer)), answer, cap(reply(wrong)))
    return QA(kind, lang, question, reply(answer), answer, reply(wrong))


def pick_other(rng: random.Random, options: Iterable[Any], correct: Any) -> Any:
    """A random option different from `correct` (options may contain duplicates of it)."""
    choices = [o for o in dict.fromkeys(options) if o != correct]
    return rng.choice(choices)


def wrong_number(rng: random.Random, n: int) -> int:
    """A plausible wrong result near `n` (never negative, never equal)."""
    while True:
        w = n + rng.choice((-1, 1)) * rng.randint(1, 10)
        if w >= 0 and w != n:
            return w
