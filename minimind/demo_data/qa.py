"""Question/answer builders for facts and arithmetic, and the mixture the training files draw from.

Every builder returns a `QA`: one question, a correct full-sentence reply, the short exact answer that
reply contains, and a wrong reply written with the *same* template (so a DPO pair differs only in the
fact). Builders take a `Pools` so the same code produces training items (train pools) and held-out
items (eval pools). String tasks live in `wordplay.py`, identity and small talk in `persona.py`.
"""

from __future__ import annotations

import random

from minimind.demo_data import tables as T
from minimind.demo_data.common import QA, Builder, Lang, Pools, article, make_qa, pick_other, wrong_number
from minimind.demo_data.persona import identity
from minimind.demo_data.wordplay import string_task, word_knowledge

# ---------------------------------------------------------------- arithmetic

OP_WORD_EN = {"+": "plus", "-": "minus", "*": "times"}
OP_WORD_ZH = {"+": "加", "-": "减", "*": "乘以"}
OP_SYM_ZH = {"+": "+", "-": "-", "*": "×"}


def apply_op(op: str, a: int, b: int) -> int:
    """The exact result of `a op b`."""
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_qa(a: int, b: int, op: str, lang: Lang, rng: random.Random) -> QA:
    """A QA about `a op b` with a random phrasing."""
    c = apply_op(op, a, b)
    wrong = str(wrong_number(rng, c))
    if lang == "en":
        s, w = op, OP_WORD_EN[op]
        q = rng.choice(
            (
                f"What is {a} {s} {b}?",
                f"What is {a} {w} {b}?",
                f"Calculate {a} {s} {b}.",
                f"How much is {a} {w} {b}?",
                f"Compute {a} {s} {b}.",
                f"{a} {s} {b} = ?",
            )
        )
        tmpl = rng.choice(
            (f"{a} {s} {b} = {{}}.", f"{a} {w} {b} equals {{}}.", f"{a} {s} {b} = {{}}.", "The answer is {}.")
        )
    else:
        s, w = OP_SYM_ZH[op], OP_WORD_ZH[op]
        q = rng.choice(
            (
                f"{a}{w}{b}等于多少？",
                f"计算{a} {s} {b}。",
                f"{a} {s} {b} 等于几？",
                f"请算一下{a}{w}{b}。",
                f"{a}{w}{b}是多少？",
            )
        )
        tmpl = rng.choice(
            (f"{a} {s} {b} = {{}}。", f"{a}{w}{b}等于{{}}。", f"{a} {s} {b} = {{}}。", "答案是{}。")
        )
    return make_qa("arithmetic", lang, q, tmpl.format, str(c), wrong)


def arithmetic(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """Addition or subtraction of 0..99, or a single-digit product, from the pool's side of the split."""
    op = rng.choice(("+", "+", "-", "-", "*"))
    a, b = pools.arith.draw(rng, op)
    return arithmetic_qa(a, b, op, lang, rng)


# ---------------------------------------------------------------- countries


def capital_of(c: T.Country, lang: Lang, rng: random.Random, wrong_pool=T.COUNTRIES) -> QA:
    """The question "What is the capital of X?" for a given country."""
    if lang == "en":
        q = rng.choice(
            (
                f"What is the capital of {c.en}?",
                f"Which city is the capital of {c.en}?",
                f"Tell me the capital of {c.en}.",
                f"Name the capital city of {c.en}.",
                f"What city is the capital of {c.en}?",
            )
        )
        tmpl = rng.choice((f"The capital of {c.en} is {{}}.", f"{{}} is the capital of {c.en}."))
        wrong = pick_other(rng, [x.capital_en for x in wrong_pool], c.capital_en)
        return make_qa("capital", lang, q, tmpl.format, c.capital_en, wrong)
    q = rng.choice(
        (
            f"{c.zh}的首都是哪里？",
            f"{c.zh}的首都是哪座城市？",
            f"请告诉我{c.zh}的首都。",
            f"{c.zh}的首都叫什么？",
            f"哪座城市是{c.zh}的首都？",
        )
    )
    tmpl = rng.choice((f"{c.zh}的首都是{{}}。", f"{{}}是{c.zh}的首都。"))
    wrong = pick_other(rng, [x.capital_zh for x in wrong_pool], c.capital_zh)
    return make_qa("capital", lang, q, tmpl.format, c.capital_zh, wrong)


def capital(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """The capital of a country from the pool."""
    return capital_of(rng.choice(pools.countries), lang, rng)


def continent(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """The continent a country from the pool lies in."""
    c = rng.choice(pools.countries)
    wrong = pick_other(rng, T.CONTINENTS, c.continent)
    if lang == "en":
        q = rng.choice(
            (
                f"Which continent is {c.en} in?",
                f"On which continent is {c.en}?",
                f"{c.en} is on which continent?",
                f"In which continent can you find {c.en}?",
            )
        )
        tmpl = rng.choice((f"{c.en} is in {{}}.", f"{c.en} is located in {{}}."))
        return make_qa("continent", lang, q, tmpl.format, c.continent.en, wrong.en)
    q = rng.choice((f"{c.zh}位于哪个大洲？", f"{c.zh}在哪个洲？", f"{c.zh}属于哪个大洲？"))
    tmpl = rng.choice((f"{c.zh}位于{{}}。", f"{c.zh}在{{}}。"))
    return make_qa("continent", lang, q, tmpl.format, c.continent.zh, wrong.zh)


# ---------------------------------------------------------------- elements


def element_symbol(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """The chemical symbol of an element from the pool."""
    e = rng.choice(pools.elements)
    wrong = pick_other(rng, [x.symbol for x in T.ELEMENTS], e.symbol)
    if lang == "en":
        q = rng.choice(
            (
                f"What is the chemical symbol of {e.en}?",
                f"What is the symbol for {e.en}?",
                f"Which symbol stands for {e.en} in chemistry?",
                f"Give the chemical symbol of {e.en}.",
            )
        )
        tmpl = rng.choice((f"The chemical symbol of {e.en} is {{}}.", f"{e.en} has the symbol {{}}."))
        return make_qa("symbol", lang, q, tmpl.format, e.symbol, wrong)
    q = rng.choice((f"{e.zh}的化学符号是什么？", f"{e.zh}元素的符号是什么？", f"写出{e.zh}的化学符号。"))
    tmpl = rng.choice((f"{e.zh}的化学符号是{{}}。", f"{e.zh}元素的符号是{{}}。"))
    return make_qa("symbol", lang, q, tmpl.format, e.symbol, wrong)


def element_number(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """The atomic number of an element from the pool."""
    e = rng.choice(pools.elements)
    wrong = str(max(1, wrong_number(rng, e.number)) if e.number != 1 else rng.randint(2, 9))
    if lang == "en":
        q = rng.choice((f"What is the atomic number of {e.en}?", f"What atomic number does {e.en} have?"))
        tmpl = rng.choice((f"The atomic number of {e.en} is {{}}.", f"{e.en} has atomic number {{}}."))
        return make_qa("atomic_number", lang, q, tmpl.format, str(e.number), wrong)
    q = rng.choice((f"{e.zh}的原子序数是多少？", f"{e.zh}元素的原子序数是几？"))
    return make_qa("atomic_number", lang, q, f"{e.zh}的原子序数是{{}}。".format, str(e.number), wrong)


def element_by_symbol(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """Which element a chemical symbol stands for."""
    e = rng.choice(pools.elements)
    wrong = pick_other(rng, T.ELEMENTS, e)
    if lang == "en":
        q = rng.choice(
            (
                f"Which element has the symbol {e.symbol}?",
                f"What element does the symbol {e.symbol} stand for?",
            )
        )
        return make_qa(
            "element_by_symbol", lang, q, f"The symbol {e.symbol} stands for {{}}.".format, e.en, wrong.en
        )
    q = rng.choice((f"化学符号{e.symbol}代表哪种元素？", f"符号为{e.symbol}的元素是什么？"))
    return make_qa("element_by_symbol", lang, q, f"化学符号{e.symbol}代表{{}}元素。".format, e.zh, wrong.zh)


def element_state(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """Whether an element is a solid, liquid or gas at room temperature."""
    e = rng.choice(pools.elements)
    wrong = pick_other(rng, T.STATES, e.state)
    if lang == "en":
        q = f"Is {e.en} a solid, a liquid or a gas at room temperature?"
        return make_qa(
            "state", lang, q, f"At room temperature, {e.en} is a {{}}.".format, e.state.en, wrong.en
        )
    q = rng.choice((f"常温下{e.zh}是固体、液体还是气体？", f"在室温下，{e.zh}是什么状态？"))
    return make_qa("state", lang, q, f"常温下{e.zh}是{{}}。".format, e.state.zh, wrong.zh)


# ---------------------------------------------------------------- animals


def animal_fact(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """A sound, leg-count, habitat or colour question about an animal from the pool."""
    a = rng.choice(pools.animals)
    facets = ["habitat"]
    if a.sound_en:
        facets += ["sound", "sound"]
    if a.legs:  # zero legs makes an awkward "has 0 legs" answer; the prose says "no legs" instead
        facets.append("legs")
    if a.colour_en:
        facets.append("colour")
    facet = rng.choice(facets)
    en = lang == "en"
    if facet == "sound":
        wrong_a = pick_other(rng, [x for x in T.ANIMALS if x.sound_en], a)
        if en:
            q = rng.choice(
                (
                    f"What sound does {article(a.en)} make?",
                    f"What noise does {article(a.en)} make?",
                    f"What does {article(a.en)} say?",
                )
            )
            tmpl = rng.choice((f"{article(a.en)} says '{{}}'.", f"{a.en_plural} say '{{}}'."))
            return make_qa("animal_sound", lang, q, tmpl.format, a.sound_en, wrong_a.sound_en)
        q = rng.choice((f"{a.zh}怎么叫？", f"{a.zh}的叫声是什么样的？", f"{a.zh}发出什么声音？"))
        tmpl = rng.choice((f"{a.zh}的叫声是“{{}}”。", f"{a.zh}会“{{}}”地叫。"))
        return make_qa("animal_sound", lang, q, tmpl.format, a.sound_zh, wrong_a.sound_zh)
    if facet == "legs":
        wrong = str(pick_other(rng, (2, 4, 6, 8), a.legs))
        if en:
            q = rng.choice(
                (f"How many legs does {article(a.en)} have?", f"How many legs do {a.en_plural} have?")
            )
            return make_qa(
                "animal_legs", lang, q, f"{article(a.en)} has {{}} legs.".format, str(a.legs), wrong
            )
        q = rng.choice((f"{a.zh}有几条腿？", f"一{a.zh_measure}{a.zh}有多少条腿？"))
        return make_qa("animal_legs", lang, q, f"{a.zh}有{{}}条腿。".format, str(a.legs), wrong)
    if facet == "colour":
        wrong_c = pick_other(
            rng, [(x.colour_en, x.colour_zh) for x in T.ANIMALS if x.colour_en], (a.colour_en, a.colour_zh)
        )
        if en:
            q = rng.choice(
                (f"What colour is {article(a.en)}?", f"What is the usual colour of {article(a.en)}?")
            )
            return make_qa(
                "animal_colour", lang, q, f"{article(a.en)} is usually {{}}.".format, a.colour_en, wrong_c[0]
            )
        q = rng.choice((f"{a.zh}通常是什么颜色的？", f"{a.zh}是什么颜色？"))
        return make_qa("animal_colour", lang, q, f"{a.zh}通常是{{}}的。".format, a.colour_zh, wrong_c[1])
    wrong_h = pick_other(rng, [x.habitat for x in T.ANIMALS], a.habitat)
    if en:
        q = rng.choice(
            (
                f"Where does {article(a.en)} live?",
                f"Where do {a.en_plural} live?",
                f"What kind of place do {a.en_plural} live in?",
            )
        )
        # The reply template needs the habitat's phrase ("in the desert"), the answer is its short word.
        phrase = {h.en: h.en_phrase for h in (a.habitat, wrong_h)}
        reply = f"{a.en_plural} live {{}}.".format
        return make_qa("animal_habitat", lang, q, lambda x: reply(phrase[x]), a.habitat.en, wrong_h.en)
    q = rng.choice((f"{a.zh}生活在哪里？", f"{a.zh}住在什么地方？"))
    phrase = {h.zh: h.zh_phrase for h in (a.habitat, wrong_h)}
    return make_qa(
        "animal_habitat", lang, q, lambda x: f"{a.zh}生活在{phrase[x]}。", a.habitat.zh, wrong_h.zh
    )


# ---------------------------------------------------------------- planets, units, calendar, misc (train only)


def planet(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """Planet order from the Sun, or planet type."""
    p = rng.choice(T.PLANETS)
    other = pick_other(rng, T.PLANETS, p)
    en = lang == "en"
    if rng.random() < 0.7:
        if en:
            o = T.ORDINALS_EN[p.order]
            q = rng.choice((f"Which planet is {o} from the Sun?", f"What is the {o} planet from the Sun?"))
            return make_qa(
                "planet_order", lang, q, f"{{}} is the {o} planet from the Sun.".format, p.en, other.en
            )
        n = T.zh_number(p.order)
        q = rng.choice((f"距离太阳第{n}近的行星是哪颗？", f"太阳系中从内往外数第{n}颗行星是什么？"))
        return make_qa("planet_order", lang, q, f"从太阳往外数，第{n}颗行星是{{}}。".format, p.zh, other.zh)
    wrong = pick_other(rng, [(x.kind_en, x.kind_zh) for x in T.PLANETS], (p.kind_en, p.kind_zh))
    if en:
        return make_qa(
            "planet_kind",
            lang,
            f"What type of planet is {p.en}?",
            f"{p.en} is a {{}}.".format,
            p.kind_en,
            wrong[0],
        )
    return make_qa(
        "planet_kind", lang, f"{p.zh}是哪一类行星？", f"{p.zh}是一颗{{}}。".format, p.kind_zh, wrong[1]
    )


def unit_conversion(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """Convert n of a big unit into a small unit (n >= 2 keeps the English plurals simple)."""
    u = rng.choice(T.UNITS)
    n = rng.randint(2, 12)
    x = n * u.factor
    wrong = str(pick_other(rng, (x + u.factor, x - u.factor, n * 10, n * 100, n * 60, x * 10), x))
    if lang == "en":
        big = u.big_en_plural
        q = rng.choice(
            (
                f"How many {u.small_en} are in {n} {big}?",
                f"Convert {n} {big} to {u.small_en}.",
                f"{n} {big} is how many {u.small_en}?",
            )
        )
        tmpl = rng.choice((f"{n} {big} is {{}} {u.small_en}.", f"{n} {big} equals {{}} {u.small_en}."))
        return make_qa("unit", lang, q, tmpl.format, str(x), wrong)
    q = rng.choice(
        (
            f"{n}{u.big_zh}等于多少{u.small_zh}？",
            f"{n}{u.big_zh}是多少{u.small_zh}？",
            f"把{n}{u.big_zh}换算成{u.small_zh}。",
        )
    )
    return make_qa("unit", lang, q, f"{n}{u.big_zh}等于{{}}{u.small_zh}。".format, str(x), wrong)


def calendar(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """Day after/before a weekday, days in a month, or the n-th month."""
    en = lang == "en"
    roll = rng.random()
    if roll < 0.45:
        i = rng.randrange(7)
        step = rng.choice((1, -1))
        d, x = T.DAYS[i], T.DAYS[(i + step) % 7]
        wrong = pick_other(rng, T.DAYS, x)
        if en:
            rel = "after" if step == 1 else "before"
            q = rng.choice((f"What day comes {rel} {d[0]}?", f"What is the day {rel} {d[0]}?"))
            return make_qa("weekday", lang, q, f"The day {rel} {d[0]} is {{}}.".format, x[0], wrong[0])
        rel = "后一天" if step == 1 else "前一天"
        q = rng.choice((f"{d[1]}的{rel}是星期几？", f"{d[1]}的{rel}是哪天？"))
        return make_qa("weekday", lang, q, f"{d[1]}的{rel}是{{}}。".format, x[1], wrong[1])
    if roll < 0.8:
        m = rng.choice(T.MONTHS)
        wrong = str(pick_other(rng, (28, 30, 31), m[2]))
        if en:
            q = rng.choice((f"How many days are there in {m[0]}?", f"How many days does {m[0]} have?"))
            tail = ", or 29 in a leap year." if m[2] == 28 else "."
            return make_qa("month_days", lang, q, (f"{m[0]} has {{}} days" + tail).format, str(m[2]), wrong)
        q = rng.choice((f"{m[1]}有多少天？", f"{m[1]}有几天？"))
        tail = "，闰年有29天。" if m[2] == 28 else "。"
        return make_qa("month_days", lang, q, (f"{m[1]}有{{}}天" + tail).format, str(m[2]), wrong)
    i = rng.randrange(12)
    m = T.MONTHS[i]
    wrong = pick_other(rng, T.MONTHS, m)
    if en:
        o = T.ORDINALS_EN[i + 1]
        q = rng.choice(
            (f"Which month is the {o} month of the year?", f"What is month number {i + 1} of the year?")
        )
        return make_qa("month_order", lang, q, f"The {o} month of the year is {{}}.".format, m[0], wrong[0])
    q = f"一年中的第{i + 1}个月是几月？"
    return make_qa("month_order", lang, q, f"一年中的第{i + 1}个月是{{}}。".format, m[1], wrong[1])


def counting_task(rng: random.Random, lang: Lang, pools: Pools) -> QA:
    """A string task whose answer is a number or one letter (no reversing or upper-casing)."""
    return string_task(rng, lang, pools, rewrites=False)


HOLDOUT_BUILDERS: dict[str, Builder] = {
    "arithmetic": arithmetic,
    "capital": capital,
    "continent": continent,
    "symbol": element_symbol,
    "atomic_number": element_number,
    "element_by_symbol": element_by_symbol,
    "state": element_state,
    "animal": animal_fact,
    "string": string_task,
    "string_count": counting_task,
}
# Training-only builders (their tables are too small to hold anything out).
TRAIN_ONLY_BUILDERS: dict[str, Builder] = {
    "identity": identity,
    "planet": planet,
    "unit": unit_conversion,
    "calendar": calendar,
    "word": word_knowledge,
}

# Mixture weights for the training files: (builder name, weight), in a fixed order.
TRAIN_MIX: tuple[tuple[str, float], ...] = (
    ("arithmetic", 34),
    ("capital", 9),
    ("continent", 4),
    ("symbol", 4),
    ("atomic_number", 2),
    ("element_by_symbol", 2),
    ("state", 1),
    ("animal", 6),
    ("string", 14),
    ("identity", 9),
    ("planet", 3),
    ("unit", 4),
    ("calendar", 4),
    ("word", 4),
)
ALL_BUILDERS: dict[str, Builder] = {**HOLDOUT_BUILDERS, **TRAIN_ONLY_BUILDERS}


def draw(rng: random.Random, lang: Lang, pools: Pools, mix: tuple[tuple[str, float], ...] = TRAIN_MIX) -> QA:
    """One QA from the weighted mixture `mix`."""
    names = [n for n, _ in mix]
    name = rng.choices(names, weights=[w for _, w in mix])[0]
    return ALL_BUILDERS[name](rng, lang, pools)
