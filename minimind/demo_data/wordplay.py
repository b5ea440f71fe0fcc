"""Word and string questions: spelling tasks, opposites, colours of things, translations."""

from __future__ import annotations

import random

from minimind.demo_data import tables as T
from minimind.demo_data.common import QA, Lang, Pools, make_qa, pick_other


def word_knowledge(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """Colours of things, opposites, and English/Chinese word translations."""
    en = lang == "en"
    roll = rng.random()
    if roll < 0.3:
        t = rng.choice(T.THING_COLOURS)
        wrong = pick_other(rng, [(x[2], x[3]) for x in T.THING_COLOURS], (t[2], t[3]))
        if en:
            return make_qa(
                "thing_colour", lang, f"What colour is {t[0]}?", f"{t[0]} is {{}}.".format, t[2], wrong[0]
            )
        return make_qa(
            "thing_colour", lang, f"{t[1]}是什么颜色的？", f"{t[1]}是{{}}的。".format, t[3], wrong[1]
        )
    if roll < 0.6:
        o = rng.choice(T.OPPOSITES)
        flip = rng.random() < 0.5
        en_w, en_x = (o[1], o[0]) if flip else (o[0], o[1])
        zh_w, zh_x = (o[3], o[2]) if flip else (o[2], o[3])
        if en:
            wrong = pick_other(rng, [x[1] for x in T.OPPOSITES], en_x)
            q = rng.choice((f"What is the opposite of '{en_w}'?", f"Give the opposite of the word '{en_w}'."))
            return make_qa("opposite", lang, q, f"The opposite of '{en_w}' is '{{}}'.".format, en_x, wrong)
        wrong = pick_other(rng, [x[3] for x in T.OPPOSITES], zh_x)
        q = rng.choice((f"“{zh_w}”的反义词是什么？", f"请说出“{zh_w}”的反义词。"))
        return make_qa("opposite", lang, q, f"“{zh_w}”的反义词是“{{}}”。".format, zh_x, wrong)
    w = rng.choice(pools.words)
    other = pick_other(rng, pools.words, w)
    if en:
        q = rng.choice(
            (
                f"How do you say '{w[0]}' in Chinese?",
                f"What is '{w[0]}' in Chinese?",
                f"Translate '{w[0]}' into Chinese.",
            )
        )
        return make_qa("translate", lang, q, f"'{w[0]}' in Chinese is '{{}}'.".format, w[1], other[1])
    q = rng.choice((f"“{w[1]}”用英语怎么说？", f"“{w[1]}”的英文是什么？", f"把“{w[1]}”翻译成英语。"))
    return make_qa("translate", lang, q, f"“{w[1]}”的英文是“{{}}”。".format, w[0], other[0])


# ---------------------------------------------------------------- string tasks


def _garble(rng: random.Random, word: str) -> str:
    """A near miss for a string answer: two letters swapped, or one dropped."""
    if len(word) > 2 and rng.random() < 0.6:
        i = rng.randrange(len(word) - 1)
        out = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        if out != word:
            return out
    i = rng.randrange(len(word))
    return word[:i] + word[i + 1 :]


def string_task(rng: random.Random, lang: Lang, pools: Pools, rewrites: bool = True) -> QA:
    """Reverse, upper-case, count letters, first letter, letter occurrences, Chinese character count.

    `rewrites=False` leaves out reversing and upper-casing (answers that spell a whole word out)."""
    w, zh = rng.choice(pools.words)
    en = lang == "en"
    task = rng.choice(
        (("reverse", "reverse", "upper") if rewrites else ()) + ("length", "first", "count")
        + (() if en else ("chars",))
    )
    if task == "reverse":
        x = w[::-1]
        wrong = _garble(rng, x)
        if en:
            q = rng.choice(
                (
                    f"Reverse the word '{w}'.",
                    f"What is '{w}' spelled backwards?",
                    f"Write the word '{w}' backwards.",
                )
            )
            tmpl = rng.choice((f"'{w}' reversed is '{{}}'.", f"The word '{w}' spelled backwards is '{{}}'."))
            return make_qa("reverse", lang, q, tmpl.format, x, wrong)
        q = rng.choice((f"把单词“{w}”倒过来写。", f"单词“{w}”反过来拼是什么？"))
        return make_qa("reverse", lang, q, f"“{w}”倒过来写是“{{}}”。".format, x, wrong)
    if task == "upper":
        x = w.upper()
        wrong = rng.choice((w.capitalize(), _garble(rng, x))) if len(w) > 1 else w
        if en:
            q = rng.choice(
                (
                    f"Write '{w}' in uppercase.",
                    f"Convert '{w}' to capital letters.",
                    f"What is '{w}' in upper case?",
                )
            )
            return make_qa("upper", lang, q, f"'{w}' in uppercase is '{{}}'.".format, x, wrong)
        q = rng.choice((f"把“{w}”转换成大写字母。", f"“{w}”的大写形式是什么？"))
        return make_qa("upper", lang, q, f"“{w}”的大写形式是“{{}}”。".format, x, wrong)
    if task == "length":
        x, wrong = str(len(w)), str(len(w) + rng.choice((-1, 1, 2)))
        if en:
            q = rng.choice((f"How many letters are in the word '{w}'?", f"Count the letters in '{w}'."))
            return make_qa("length", lang, q, f"The word '{w}' has {{}} letters.".format, x, wrong)
        q = rng.choice((f"单词“{w}”有几个字母？", f"“{w}”由多少个字母组成？"))
        return make_qa("length", lang, q, f"单词“{w}”有{{}}个字母。".format, x, wrong)
    if task == "first":
        wrong = pick_other(rng, list("abcdefghijklmnopqrstuvwxyz"), w[0])
        if en:
            return make_qa(
                "first_letter",
                lang,
                f"What is the first letter of '{w}'?",
                f"The first letter of '{w}' is '{{}}'.".format,
                w[0],
                wrong,
            )
        return make_qa(
            "first_letter",
            lang,
            f"“{w}”的第一个字母是什么？",
            f"“{w}”的第一个字母是“{{}}”。".format,
            w[0],
            wrong,
        )
    if task == "count":
        letter = rng.choice(w)
        n = w.count(letter)
        wrong = str(n + 1)
        if en:
            q = f"How many times does the letter '{letter}' appear in '{w}'?"
            return QA(
                "letter_count",
                lang,
                q,
                f"The letter '{letter}' appears {n} time{'s' * (n != 1)} in '{w}'.",
                str(n),
                f"The letter '{letter}' appears {wrong} times in '{w}'.",
            )
        q = f"字母“{letter}”在“{w}”中出现了几次？"
        return make_qa(
            "letter_count", lang, q, f"字母“{letter}”在“{w}”中出现了{{}}次。".format, str(n), wrong
        )
    x, wrong = str(len(zh)), str(len(zh) + 1)
    return make_qa("zh_chars", lang, f"“{zh}”这个词有几个字？", f"“{zh}”这个词有{{}}个字。".format, x, wrong)
