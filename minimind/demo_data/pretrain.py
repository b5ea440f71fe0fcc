"""Templated prose paragraphs for the pretraining text.

Each topic function writes one paragraph in one language, picking facts from the tables and one of
several phrasings per fact, so the model sees the same fact said in many ways. Prose uses *every*
table entry (the held-out ones too: the SFT eval asks about those to test transfer from pretraining),
while arithmetic and the Q/A-style "quiz" paragraphs only use the training side of the split.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from minimind.demo_data import tables as T
from minimind.demo_data.common import Lang, Pools, article, cap
from minimind.demo_data.persona import IDENTITY_STATEMENTS
from minimind.demo_data.qa import apply_op, draw

Paragraph = Callable[[random.Random, Lang, Pools], str]
PET_NAMES_EN = ("Pip", "Coco", "Sunny", "Bubbles", "Dot", "Button", "Maple", "Pebble")
PET_NAMES_ZH = ("小白", "豆豆", "花花", "点点", "乐乐", "贝贝", "圆圆", "球球")


def _join(lang: Lang, sentences: list[str]) -> str:
    """English sentences are capitalised and space-separated; Chinese ones are simply concatenated."""
    if lang == "en":
        return " ".join(cap(s) for s in sentences if s)
    return "".join(s for s in sentences if s)


def _intro(rng: random.Random, lang: Lang, en: tuple[str, ...], zh: tuple[str, ...]) -> list[str]:
    """An optional opening sentence (about half the time) so paragraphs do not all start alike."""
    return [rng.choice(en if lang == "en" else zh)] if rng.random() < 0.5 else []


def _list_en(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _list_zh(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def countries(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Capitals and continents."""
    out = _intro(
        rng,
        lang,
        (
            "Here are some facts about countries and their capitals.",
            "A short geography lesson.",
            "Every country has a capital city.",
        ),
        ("下面是一些关于国家和首都的知识。", "地理小知识。", "每个国家都有自己的首都。"),
    )
    for c in rng.sample(T.COUNTRIES, rng.randint(3, 6)):
        cap_, cont = (c.capital_en, c.continent.en) if lang == "en" else (c.capital_zh, c.continent.zh)
        if lang == "en":
            out.append(
                rng.choice(
                    (
                        f"The capital of {c.en} is {cap_}.",
                        f"{cap_} is the capital city of {c.en}.",
                        f"{c.en} is a country in {cont}, and its capital is {cap_}.",
                        f"{c.en} lies in {cont}.",
                        f"If you visit {c.en}, you may start in {cap_}, its capital.",
                        f"{cap_}, the capital of {c.en}, is a city in {cont}.",
                        f"The government of {c.en} sits in {cap_}, the capital.",
                    )
                )
            )
        else:
            out.append(
                rng.choice(
                    (
                        f"{c.zh}的首都是{cap_}。",
                        f"{cap_}是{c.zh}的首都。",
                        f"{c.zh}是{cont}的一个国家，首都是{cap_}。",
                        f"{c.zh}位于{cont}。",
                        f"{c.zh}的首都{cap_}是一座位于{cont}的城市。",
                        f"如果你去{c.zh}旅行，可以先去首都{cap_}看看。",
                        f"{c.zh}的政府设在首都{cap_}。",
                    )
                )
            )
    if rng.random() < 0.3:
        cont = rng.choice(T.CONTINENTS)
        members = [c for c in T.COUNTRIES if c.continent == cont]
        picked = rng.sample(members, min(3, len(members)))
        if lang == "en":
            out.append(f"{cont.en} is home to many countries, such as {_list_en([c.en for c in picked])}.")
        else:
            out.append(f"{cont.zh}有很多国家，比如{_list_zh([c.zh for c in picked])}。")
    return _join(lang, out)


def elements(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Chemical symbols, atomic numbers and states of matter."""
    out = _intro(
        rng,
        lang,
        (
            "In chemistry, every element has a symbol and an atomic number.",
            "Some facts about chemical elements.",
        ),
        ("在化学中，每种元素都有自己的符号和原子序数。", "下面介绍几种化学元素。"),
    )
    for e in rng.sample(T.ELEMENTS, rng.randint(3, 5)):
        s, n = e.symbol, e.number
        if lang == "en":
            out.append(
                rng.choice(
                    (
                        f"The chemical symbol of {e.en} is {s}.",
                        f"{e.en} has the symbol {s} and the atomic number {n}.",
                        f"Element number {n} is {e.en}.",
                        f"{s} is the symbol for {e.en}.",
                        f"At room temperature, {e.en} is a {e.state.en}.",
                        f"An atom of {e.en} has {n} protons.",
                        f"{e.en}, written {s}, is element number {n} in the periodic table.",
                    )
                )
            )
        else:
            out.append(
                rng.choice(
                    (
                        f"{e.zh}的化学符号是{s}。",
                        f"{e.zh}的元素符号是{s}，原子序数是{n}。",
                        f"原子序数为{n}的元素是{e.zh}。",
                        f"{s}是{e.zh}的化学符号。",
                        f"常温下，{e.zh}是{e.state.zh}。",
                        f"一个{e.zh}原子有{n}个质子。",
                        f"{e.zh}的符号写作{s}，在元素周期表中排第{n}位。",
                    )
                )
            )
    return _join(lang, out)


def planets(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Planet order, kinds and one notable fact each."""
    en = lang == "en"
    out = _intro(
        rng,
        lang,
        ("There are eight planets in the Solar System.", "Let us talk about the planets."),
        ("太阳系有八大行星。", "我们来聊聊行星。"),
    )
    if rng.random() < 0.3:
        names = [p.en if en else p.zh for p in T.PLANETS]
        out.append(
            f"In order from the Sun, the planets are {_list_en(names)}."
            if en
            else f"按照离太阳由近到远的顺序，行星依次是{_list_zh(names)}。"
        )
    for p in rng.sample(T.PLANETS, rng.randint(2, 4)):
        note_en, note_zh = T.PLANET_NOTES[p.order - 1]
        if en:
            o = T.ORDINALS_EN[p.order]
            out.append(
                rng.choice(
                    (
                        f"{p.en} is the {o} planet from the Sun.",
                        f"{p.en} is a {p.kind_en}.",
                        note_en,
                        f"The {o} planet from the Sun is {p.en}, a {p.kind_en}.",
                    )
                )
            )
        else:
            n = T.zh_number(p.order)
            out.append(
                rng.choice(
                    (
                        f"{p.zh}是距离太阳第{n}近的行星。",
                        f"{p.zh}是一颗{p.kind_zh}。",
                        note_zh,
                        f"从太阳往外数，第{n}颗行星是{p.zh}，它是一颗{p.kind_zh}。",
                    )
                )
            )
    return _join(lang, out)


def _animal_sentence(rng: random.Random, lang: Lang, a: T.Animal) -> str:
    en = lang == "en"
    options: list[str] = []
    if a.sound_en:
        options += (
            [f"{article(a.en)} says '{a.sound_en}'.", f"{a.en_plural} say '{a.sound_en}'."]
            if en
            else [f"{a.zh}的叫声是“{a.sound_zh}”。", f"{a.zh}会“{a.sound_zh}”地叫。"]
        )
    if a.legs is not None:
        if a.legs == 0:
            options.append(f"{a.en_plural} have no legs." if en else f"{a.zh}没有腿。")
        else:
            options += (
                [f"{article(a.en)} has {a.legs} legs.", f"{a.en_plural} have {a.legs} legs."]
                if en
                else [f"{a.zh}有{a.legs}条腿。", f"一{a.zh_measure}{a.zh}有{a.legs}条腿。"]
            )
    options += (
        [f"{a.en_plural} live {a.habitat.en_phrase}.", f"You can find {a.en_plural} {a.habitat.en_phrase}."]
        if en
        else [f"{a.zh}生活在{a.habitat.zh_phrase}。", f"在{a.habitat.zh_phrase}可以看到{a.zh}。"]
    )
    if a.colour_en:
        options.append(
            f"{article(a.en)} is usually {a.colour_en}." if en else f"{a.zh}通常是{a.colour_zh}的。"
        )
    return rng.choice(options)


def animals(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Animal sounds, legs, habitats and colours."""
    out = _intro(
        rng,
        lang,
        ("Animals are interesting.", "Here are some facts about animals."),
        ("动物们很有趣。", "下面是一些关于动物的知识。"),
    )
    for a in rng.sample(T.ANIMALS, rng.randint(3, 5)):
        out.append(_animal_sentence(rng, lang, a))
    if rng.random() < 0.25:
        h = rng.choice([a.habitat for a in T.ANIMALS])
        members = [a for a in T.ANIMALS if a.habitat == h]
        if len(members) >= 2:
            if lang == "en":
                out.append(
                    f"Animals that live {h.en_phrase} include {_list_en([a.en_plural for a in members])}."
                )
            else:
                out.append(f"生活在{h.zh_phrase}的动物有{_list_zh([a.zh for a in members])}。")
    return _join(lang, out)


def units(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Unit definitions and conversions."""
    out = _intro(
        rng,
        lang,
        ("Units help us measure things.", "Some useful unit conversions."),
        ("单位可以帮助我们测量东西。", "常用的单位换算。"),
    )
    for u in rng.sample(T.UNITS, rng.randint(2, 4)):
        n = rng.randint(2, 12)
        if lang == "en":
            out.append(
                rng.choice(
                    (
                        f"One {u.big_en} is {u.factor} {u.small_en}.",
                        f"There are {u.factor} {u.small_en} in one {u.big_en}.",
                        f"{n} {u.big_en_plural} is {n * u.factor} {u.small_en}.",
                        f"To turn {u.big_en_plural} into {u.small_en}, multiply by {u.factor}.",
                    )
                )
            )
        else:
            out.append(
                rng.choice(
                    (
                        f"1{u.big_zh}等于{u.factor}{u.small_zh}。",
                        f"{n}{u.big_zh}等于{n * u.factor}{u.small_zh}。",
                        f"把{u.big_zh}换算成{u.small_zh}，要乘以{u.factor}。",
                        f"一{u.big_zh}有{u.factor}{u.small_zh}。",
                    )
                )
            )
    return _join(lang, out)


def calendar(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Weekdays and months."""
    en = lang == "en"
    out: list[str] = []
    if rng.random() < 0.3:
        out.append(
            "There are seven days in a week: " + _list_en([d[0] for d in T.DAYS]) + "."
            if en
            else "一个星期有七天：" + _list_zh([d[1] for d in T.DAYS]) + "。"
        )
    if rng.random() < 0.2:
        out.append("There are twelve months in a year." if en else "一年有十二个月。")
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.5:
            i = rng.randrange(7)
            k = rng.randint(1, 3)
            d, d1, dk = T.DAYS[i], T.DAYS[(i + 1) % 7], T.DAYS[(i + k) % 7]
            if en:
                out.append(
                    rng.choice(
                        (
                            f"The day after {d[0]} is {d1[0]}.",
                            f"{d[0]} comes before {d1[0]}.",
                            f"{T.NUMBER_WORDS_EN[k]} day{'s' * (k > 1)} after {d[0]} it is {dk[0]}.",
                        )
                    )
                )
            else:
                out.append(
                    rng.choice(
                        (f"{d[1]}的后一天是{d1[1]}。", f"{d[1]}之后是{d1[1]}。", f"{d[1]}过{k}天是{dk[1]}。")
                    )
                )
        else:
            i = rng.randrange(12)
            m, nxt = T.MONTHS[i], T.MONTHS[(i + 1) % 12]
            if en:
                days = f"{m[0]} has {m[2]} days" + (", or 29 in a leap year." if m[2] == 28 else ".")
                out.append(
                    rng.choice(
                        (
                            days,
                            f"{m[0]} is month number {i + 1} of the year.",
                            f"After {m[0]} comes {nxt[0]}.",
                        )
                    )
                )
            else:
                days = f"{m[1]}有{m[2]}天" + ("，闰年有29天。" if m[2] == 28 else "。")
                out.append(rng.choice((days, f"{m[1]}是一年中的第{i + 1}个月。", f"{m[1]}过后是{nxt[1]}。")))
    return _join(lang, out)


def words(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Colours of things, opposites and word translations."""
    en = lang == "en"
    out: list[str] = []
    for _ in range(rng.randint(3, 5)):
        roll = rng.random()
        if roll < 0.3:
            t = rng.choice(T.THING_COLOURS)
            out.append(
                rng.choice((f"{t[0]} is {t[2]}.", f"The colour of {t[0]} is {t[2]}."))
                if en
                else rng.choice((f"{t[1]}是{t[3]}的。", f"{t[1]}的颜色是{t[3]}。"))
            )
        elif roll < 0.6:
            o = rng.choice(T.OPPOSITES)
            out.append(
                rng.choice(
                    (f"The opposite of '{o[0]}' is '{o[1]}'.", f"'{o[0]}' and '{o[1]}' are opposites.")
                )
                if en
                else rng.choice((f"“{o[2]}”的反义词是“{o[3]}”。", f"“{o[2]}”和“{o[3]}”是一对反义词。"))
            )
        else:
            w = rng.choice(T.WORDS)
            out.append(
                rng.choice(
                    (
                        f"The English word '{w[0]}' means '{w[1]}' in Chinese.",
                        f"In Chinese, '{w[0]}' is written '{w[1]}'.",
                    )
                )
                if en
                else rng.choice((f"英语单词“{w[0]}”的意思是“{w[1]}”。", f"“{w[1]}”用英语说是“{w[0]}”。"))
            )
    return _join(lang, out)


def _count_en(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _arith_sentence(rng: random.Random, lang: Lang, pools: Pools) -> str:
    op = rng.choice(("+", "+", "-", "-", "*"))
    a, b = pools.arith.draw(rng, op)
    c = apply_op(op, a, b)
    en = lang == "en"
    if rng.random() < 0.2 and op != "*" and a <= 20 and b <= 20:
        fs, fp, fz, m = rng.choice(T.FRUITS)
        if en:
            name = rng.choice(T.NAMES_EN)
            if op == "+":
                return (
                    f"{name} has {_count_en(a, fs, fp)} and gets {b} more, so now {name} has "
                    f"{_count_en(c, fs, fp)}."
                )
            return (
                f"{name} had {_count_en(a, fs, fp)} and ate {b}, so {c} {'was' if c == 1 else 'were'} left."
            )
        name = rng.choice(T.NAMES_ZH)
        if op == "+":
            return f"{name}有{a}{m}{fz}，又买了{b}{m}，现在一共有{c}{m}{fz}。"
        return f"{name}有{a}{m}{fz}，吃掉了{b}{m}，还剩{c}{m}。"
    if en:
        forms = {
            "+": (
                f"{a} plus {b} equals {c}.",
                f"{a} + {b} = {c}.",
                f"If you add {a} and {b}, you get {c}.",
                f"The sum of {a} and {b} is {c}.",
            ),
            "-": (
                f"{a} minus {b} equals {c}.",
                f"{a} - {b} = {c}.",
                f"Taking {b} away from {a} leaves {c}.",
                f"The difference between {a} and {b} is {c}.",
            ),
            "*": (f"{a} times {b} is {c}.", f"{a} * {b} = {c}.", f"The product of {a} and {b} is {c}."),
        }
    else:
        forms = {
            "+": (f"{a}加{b}等于{c}。", f"{a} + {b} = {c}。", f"{a}和{b}的和是{c}。", f"{a}加上{b}得{c}。"),
            "-": (f"{a}减{b}等于{c}。", f"{a} - {b} = {c}。", f"{a}与{b}的差是{c}。", f"{a}减去{b}得{c}。"),
            "*": (f"{a}乘以{b}等于{c}。", f"{a} × {b} = {c}。", f"{a}和{b}的积是{c}。"),
        }
    return rng.choice(forms[op])


def arithmetic(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Arithmetic facts (training operand pairs only), sometimes a row of the times table."""
    en = lang == "en"
    if rng.random() < 0.12:
        a = rng.randint(2, 9)
        row = [(a, k, a * k) for k in range(1, 10) if pools.arith.ok(a, k)]
        if en:
            return f"The {a} times table: " + ", ".join(f"{x} times {k} is {p}" for x, k, p in row) + "."
        return f"{a}的乘法表：" + "，".join(f"{x}乘{k}得{p}" for x, k, p in row) + "。"
    out = _intro(
        rng,
        lang,
        ("Let us practise some arithmetic.", "Here are some sums.", "Math practice."),
        ("我们来练习一下算术。", "数学练习。", "下面是一些计算题的答案。"),
    )
    out += [_arith_sentence(rng, lang, pools) for _ in range(rng.randint(3, 6))]
    return _join(lang, out)


def strings(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Spelling facts: reversal, upper case, length, first letter, spelled-out letters."""
    out: list[str] = []
    for w, zh in rng.sample(T.WORDS, rng.randint(2, 4)):
        spelled = "-".join(w)
        if lang == "en":
            out.append(
                rng.choice(
                    (
                        f"The word '{w}' reversed is '{w[::-1]}'.",
                        f"Spelled backwards, '{w}' becomes '{w[::-1]}'.",
                        f"'{w}' in uppercase is '{w.upper()}'.",
                        f"The word '{w}' has {len(w)} letters.",
                        f"The first letter of '{w}' is '{w[0]}'.",
                        f"'{w}' is spelled {spelled}.",
                    )
                )
            )
        else:
            out.append(
                rng.choice(
                    (
                        f"单词“{w}”倒过来写是“{w[::-1]}”。",
                        f"“{w}”的大写形式是“{w.upper()}”。",
                        f"单词“{w}”有{len(w)}个字母。",
                        f"“{w}”的第一个字母是“{w[0]}”。",
                        f"“{w}”的拼写是{spelled}。",
                        f"“{zh}”这个词有{len(zh)}个字。",
                    )
                )
            )
    return _join(lang, out)


def identity(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Statements about MiniMind itself."""
    return _join(lang, rng.sample(IDENTITY_STATEMENTS[lang], rng.randint(2, 4)))


def story(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """A short animal story with a small subtraction in it."""
    a = rng.choice(T.ANIMALS)
    fs, fp, fz, m = rng.choice(T.FRUITS)
    while True:
        n, k = rng.randint(2, 9), rng.randint(1, 8)
        if k < n and pools.arith.ok(n, k):
            break
    if lang == "en":
        name = rng.choice(PET_NAMES_EN)
        out = [
            rng.choice(
                (
                    f"Once upon a time, there was {article(a.en)} named {name}.",
                    f"{name} was a little {a.en} who lived {a.habitat.en_phrase}.",
                )
            )
        ]
        out.append(
            f"Every morning, {name} said '{a.sound_en}' to greet the sun."
            if a.sound_en
            else f"Every morning, {name} liked to look at the sky."
        )
        out.append(f"One day, {name} found {n} {fp} under a tree.")
        out.append(
            f"{name} gave {k} of them to a friend, so {_count_en(n - k, fs, fp)} "
            f"{'was' if n - k == 1 else 'were'} left."
        )
        out.append(
            rng.choice(
                (
                    f"That night, {name} slept happily.",
                    f"Sharing made {name} very happy.",
                    f"{name} learned that sharing is fun.",
                )
            )
        )
        return _join(lang, out)
    name = rng.choice(PET_NAMES_ZH)
    out = [
        rng.choice(
            (
                f"从前，{a.habitat.zh_phrase}住着一{a.zh_measure}名叫{name}的{a.zh}。",
                f"{name}是一{a.zh_measure}生活在{a.habitat.zh_phrase}的{a.zh}。",
            )
        )
    ]
    out.append(
        f"每天早上，{name}都会“{a.sound_zh}”地叫，向太阳问好。"
        if a.sound_zh
        else f"每天早上，{name}都喜欢抬头看看天空。"
    )
    out.append(f"有一天，{name}在树下找到了{n}{m}{fz}。")
    out.append(f"它分给朋友{k}{m}，自己还剩{n - k}{m}。")
    out.append(
        rng.choice(
            (
                f"那天晚上，{name}开开心心地睡着了。",
                f"分享让{name}非常快乐。",
                f"{name}明白了分享是一件快乐的事。",
            )
        )
    )
    return _join(lang, out)


def dialogue(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Two people asking each other questions (training-side questions only)."""
    if lang == "en":
        a, b = rng.sample(T.NAMES_EN, 2)
        out = []
        for _ in range(rng.randint(1, 3)):
            qa = draw(rng, lang, pools)
            out.append(
                rng.choice(
                    (
                        f'{a} asked {b}, "{qa.question}" {b} answered, "{qa.reply}"',
                        f'{a} asked: "{qa.question}" {b} replied: "{qa.reply}"',
                    )
                )
            )
            a, b = b, a
        return " ".join(out)
    a, b = rng.sample(T.NAMES_ZH + ("老师",), 2)
    out = []
    for _ in range(rng.randint(1, 3)):
        qa = draw(rng, lang, pools)
        out.append(
            rng.choice(
                (
                    f"{a}问{b}：“{qa.question}”{b}回答：“{qa.reply}”",
                    f"{a}问：“{qa.question}”{b}说：“{qa.reply}”",
                )
            )
        )
        a, b = b, a
    return "".join(out)


def quiz(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """Question/answer lines, the bridge between prose and the chat format (training side only)."""
    qas = [draw(rng, lang, pools) for _ in range(rng.randint(2, 4))]
    if lang == "en":
        return "\n".join(f"Question: {qa.question}\nAnswer: {qa.reply}" for qa in qas)
    return "\n".join(f"问：{qa.question}\n答：{qa.reply}" for qa in qas)


# (topic, weight), in a fixed order. The table facts (countries, elements, animals, words) carry most of the
# weight: the held-out questions ask about entries that only the pretraining prose states, and a tiny model
# recalls a fact in a new phrasing only after reading it many times; the other topics keep the style varied.
TOPICS: tuple[tuple[Paragraph, float], ...] = (
    (countries, 20),
    (elements, 14),
    (planets, 3),
    (animals, 16),
    (units, 2),
    (calendar, 3),
    (words, 8),
    (arithmetic, 10),
    (strings, 8),
    (identity, 4),
    (story, 4),
    (dialogue, 4),
    (quiz, 10),
)


def paragraph(rng: random.Random, lang: Lang, pools: Pools) -> str:
    """One pretraining paragraph on a random topic."""
    topic = rng.choices([t for t, _ in TOPICS], weights=[w for _, w in TOPICS])[0]
    return topic(rng, lang, pools)
