"""Builders for the records of each output file (conversations, preference pairs, choice questions).

Every builder takes its own RNG and the pools for its side of the train/eval split and returns a list
of JSON-ready dicts; `generate.py` only writes them out.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from minimind.demo_data import tables as T
from minimind.demo_data.common import QA, Lang, Message, Pools, cap, lang_of
from minimind.demo_data.persona import IDENTITY_Q_HELD, RUDE, WRONG_IDENTITY, identity, small_talk
from minimind.demo_data.qa import apply_op, arithmetic_qa, capital_of, draw

SYSTEM_PROMPTS: dict[str, tuple[str, ...]] = {
    "en": (
        "You are MiniMind, a helpful assistant.",
        "You are a helpful assistant. Answer briefly and accurately.",
        "You are MiniMind. Keep your answers short.",
    ),
    "zh": (
        "你是MiniMind，一个乐于助人的助手。",
        "你是一个有用的助手，请简洁准确地回答问题。",
        "请用简短的话回答用户的问题。",
    ),
}
REASONING_SYSTEM = {
    "en": "Think step by step inside <think></think>, then give the final answer inside <answer></answer>.",
    "zh": "请先在<think></think>中一步步思考，再在<answer></answer>中给出最终答案。",
}

# Held-out questions for the eval files: every entry here can draw from the eval side of the split. Arithmetic
# asks about operand pairs held out of pretraining too (a generalisation test the demo reports on its own); the
# rest ask about facts the pretraining prose states.
EVAL_MIX: tuple[tuple[str, float], ...] = (
    ("arithmetic", 15),
    ("capital", 12),
    ("continent", 6),
    ("symbol", 8),
    ("atomic_number", 4),
    ("element_by_symbol", 4),
    ("state", 2),
    ("animal", 10),
    ("string", 9),
)
# RL prompts: questions whose answer a rule can check exactly, drawn from the kinds a CPU-trained tiny model
# answers right some of the time: letter counts and first letters, element states, animals, continents,
# identity. GRPO learns only from groups whose rewards differ, so prompts the policy never solves give it
# nothing: at demo scale that is two-digit arithmetic, capitals of unseen countries, and reversing or
# upper-casing a word (the demo's SFT model answered 0-7% of each right). Those stay in the SFT data; only a
# sliver of arithmetic stays here.
RL_MIX: tuple[tuple[str, float], ...] = (
    ("string_count", 30),
    ("animal", 14),
    ("continent", 12),
    ("state", 12),
    ("identity", 10),
    ("arithmetic", 6),
    ("calendar", 6),
    ("planet", 6),
)
# Held-out RL prompts: the same kinds, on the eval side of the split (held-out words, countries, elements,
# animals, arithmetic pairs, identity phrasings).
RL_EVAL_MIX: tuple[tuple[str, float], ...] = (
    ("string_count", 40),
    ("animal", 15),
    ("continent", 15),
    ("state", 15),
    ("identity", 5),
    ("arithmetic", 5),
)


# Kinds whose replies restate nothing from the question: the reply is the short answer itself ("Paris.",
# "亚洲。"). A reply that restates the entity ("The capital of France is Paris.") has the model write the
# entity's name first; the held-out entities never occur in post-training, so fine-tuning pushes their names
# down as outputs and the SFT model wrote a training-side country in their place ("The capital of the Czech
# Republic is Prague."). Identity, small talk and arithmetic keep their sentences (no held-out names in them).
FULL_REPLY_KINDS = frozenset({"identity", "small_talk", "arithmetic"})


def brief(qa: QA) -> QA:
    """`qa` with the short answer as its reply (and the wrong answer as its wrong reply), unless its kind
    keeps full sentences."""
    if qa.kind in FULL_REPLY_KINDS:
        return qa
    stop = "." if qa.lang == "en" else "。"

    def reply(answer: str) -> str:
        return answer if answer.endswith(stop) else answer + stop

    return QA(qa.kind, qa.lang, qa.question, reply(qa.answer), qa.answer, reply(qa.wrong))


def _msg(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def _system(rng: random.Random, lang: Lang, p: float) -> list[Message]:
    """A system message with probability `p`."""
    return [_msg("system", rng.choice(SYSTEM_PROMPTS[lang]))] if rng.random() < p else []


def _unique(
    n: int, make: Callable[[int], dict | None], key: Callable[[dict], str], max_copies: int = 1
) -> list[dict]:
    """Call `make(i)` until `n` records exist with each `key` at most `max_copies` times.

    Stops early if attempts run out (only on absurdly small pools), so a caller never loops forever.
    """
    out: list[dict] = []
    seen: dict[str, int] = {}
    attempts = 0
    while len(out) < n and attempts < 60 * n:
        rec = make(len(out))
        attempts += 1
        if rec is None or seen.get(key(rec), 0) >= max_copies:
            continue
        seen[key(rec)] = seen.get(key(rec), 0) + 1
        out.append(rec)
    return out


def user_turns(messages: list[Message]) -> str:
    """The identity of a prompt for disjointness: all user contents, in order."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


# ---------------------------------------------------------------- SFT


def _followup_capital(rng: random.Random, lang: Lang, pools: Pools) -> list[QA]:
    """A capital question, then "What about Y?": the second answer needs the first turn."""
    c1, c2 = rng.sample(pools.countries, 2)
    first, second = capital_of(c1, lang, rng), capital_of(c2, lang, rng)
    q = (
        rng.choice((f"What about {c2.en}?", f"And {c2.en}?"))
        if lang == "en"
        else rng.choice((f"那{c2.zh}呢？", f"{c2.zh}呢？"))
    )
    return [first, QA("capital", lang, cap(q), second.reply, second.answer, second.wrong)]


def _followup_arith(rng: random.Random, lang: Lang, pools: Pools) -> list[QA]:
    """A sum, then "add/subtract d to that": the second question refers back to the first result."""
    a, b = pools.arith.draw(rng, "+")
    first = arithmetic_qa(a, b, "+", lang, rng)
    c = a + b
    op = rng.choice(("+", "-"))
    while True:
        d = rng.randint(1, min(c, 20) if op == "-" and c > 0 else 20)
        if op == "-" and d > c:
            op = "+"
        if pools.arith.ok(c, d):
            break
    e = apply_op(op, c, d)
    if lang == "en":
        q = f"And if you add {d} to that?" if op == "+" else f"Now subtract {d} from that."
        reply = f"{c} {op} {d} = {e}."
    else:
        q = f"再加上{d}呢？" if op == "+" else f"再减去{d}呢？"
        reply = f"{c} {op} {d} = {e}。"
    return [first, QA("arithmetic", lang, q, reply, str(e), reply.replace(f"= {e}", f"= {e + 1}"))]


def _multi_turn(rng: random.Random, lang: Lang, pools: Pools) -> list[QA]:
    roll = rng.random()
    if roll < 0.2:
        return _followup_capital(rng, lang, pools)
    if roll < 0.4:
        return _followup_arith(rng, lang, pools)
    turns = [draw(rng, lang, pools) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.5:
        turns.insert(0, small_talk(rng, lang, 0))
    if len(turns) < 3 and rng.random() < 0.4:
        turns.append(small_talk(rng, lang, rng.choice((1, 2))))
    if len(turns) < 2:
        turns.append(draw(rng, lang, pools))
    return turns


def sft(rng: random.Random, pools: Pools, n: int) -> list[dict]:
    """Training conversations: ~15% multi-turn, ~20% with a system prompt, half in each language."""

    def make(i: int) -> dict:
        lang = lang_of(i)
        roll = rng.random()
        if roll < 0.15:
            turns = _multi_turn(rng, lang, pools)
        elif roll < 0.18:
            turns = [small_talk(rng, lang, rng.randrange(3))]
        else:
            turns = [draw(rng, lang, pools)]
        msgs = _system(rng, lang, 0.2)
        for qa in map(brief, turns):
            msgs += [_msg("user", qa.question), _msg("assistant", qa.reply)]
        return {"conversations": msgs}

    # Identity and small-talk chats may repeat a few times on purpose (that is how the persona sticks);
    # beyond that a repeat only wastes a slot.
    return _unique(n, make, key=lambda r: repr(r["conversations"]), max_copies=3)


def _eval_qa(rng: random.Random, lang: Lang, pools: Pools, i: int, n_identity: int) -> QA:
    """Held-out QA: the first `n_identity` items use held-out identity phrasings, the rest EVAL_MIX."""
    if i < n_identity:
        return identity(rng, lang, pools)
    return draw(rng, lang, pools, EVAL_MIX)


def sft_eval(rng: random.Random, pools: Pools, n: int) -> list[dict]:
    """Held-out questions with a reference reply and the short `answer` a correct reply must contain."""
    n_identity = 2 * len(IDENTITY_Q_HELD["en"])

    def make(i: int) -> dict:
        lang = lang_of(i)
        qa = brief(_eval_qa(rng, lang, pools, i, n_identity))
        msgs = _system(rng, lang, 0.2) + [_msg("user", qa.question), _msg("assistant", qa.reply)]
        return {"conversations": msgs, "answer": qa.answer, "kind": qa.kind}

    return _unique(n, make, key=lambda r: user_turns(r["conversations"]))


# ---------------------------------------------------------------- DPO


def dpo(rng: random.Random, pools: Pools, n: int) -> list[dict]:
    """Preference pairs: the rejected reply is wrong (same template), rude, or claims another identity."""
    n_identity = 0 if pools.train else 2 * len(IDENTITY_Q_HELD["en"])

    def make(i: int) -> dict:
        lang = lang_of(i)
        if pools.train:
            qa = identity(rng, lang, pools) if rng.random() < 0.12 else draw(rng, lang, pools)
        else:
            qa = _eval_qa(rng, lang, pools, i, n_identity)
        qa = brief(qa)
        prompt = _system(rng, lang, 0.2)
        if pools.train and rng.random() < 0.1:  # some context before the judged turn
            prev = brief(draw(rng, lang, pools))
            prompt += [_msg("user", prev.question), _msg("assistant", prev.reply)]
        prompt.append(_msg("user", qa.question))
        roll = rng.random()
        if qa.kind == "identity":
            bad = rng.choice(WRONG_IDENTITY[lang])
        elif roll < 0.2:
            bad = rng.choice(RUDE[lang])
        else:
            bad = qa.wrong
        return {
            "chosen": prompt + [_msg("assistant", qa.reply)],
            "rejected": prompt + [_msg("assistant", bad)],
        }

    key = (
        (lambda r: repr(r["chosen"]) + repr(r["rejected"]))
        if pools.train
        else (lambda r: user_turns(r["chosen"]))
    )
    return _unique(n, make, key=key)


# ---------------------------------------------------------------- RLAIF


def rlaif(rng: random.Random, pools: Pools, n: int) -> list[dict]:
    """RL prompts whose last assistant turn is the short reference answer for a rule reward."""

    def make(i: int) -> dict:
        lang = lang_of(i)
        msgs = _system(rng, lang, 0.2)
        if pools.train and rng.random() < 0.1:
            prev = brief(draw(rng, lang, pools))
            msgs += [_msg("user", prev.question), _msg("assistant", prev.reply)]
        qa = draw(rng, lang, pools, RL_MIX if pools.train else RL_EVAL_MIX)
        msgs += [_msg("user", qa.question), _msg("assistant", qa.answer)]
        return {"conversations": msgs}

    return _unique(n, make, key=lambda r: user_turns(r["conversations"]))


# ---------------------------------------------------------------- reasoning


def _two_step(rng: random.Random, lang: Lang, pools: Pools) -> tuple[str, str, str] | None:
    a, b = pools.arith.draw(rng, "+")
    op2 = rng.choice(("+", "-"))
    s = a + b
    c = rng.randint(0, min(s, 99)) if op2 == "-" else rng.randint(0, 99)
    if not pools.arith.ok(s, c):
        return None
    r = apply_op(op2, s, c)
    if lang == "en":
        q = rng.choice((f"What is {a} + {b} {op2} {c}?", f"Calculate {a} + {b} {op2} {c}."))
        return q, f"First, {a} + {b} = {s}. Then, {s} {op2} {c} = {r}.", str(r)
    q = rng.choice((f"计算{a} + {b} {op2} {c}。", f"{a} + {b} {op2} {c}等于多少？"))
    return q, f"先算{a} + {b} = {s}，再算{s} {op2} {c} = {r}。", str(r)


def _word_problem(rng: random.Random, lang: Lang, pools: Pools) -> tuple[str, str, str] | None:
    fs, fp, fz, m = rng.choice(T.FRUITS)
    a, b = rng.randint(2, 20), rng.randint(1, 20)
    s = a + b
    c = rng.randint(1, s)
    if not (pools.arith.ok(a, b) and pools.arith.ok(s, c)):
        return None
    r = s - c
    if lang == "en":
        name = rng.choice(T.NAMES_EN)
        q = f"{name} has {a} {fp}, buys {b} more and then gives {c} away. How many {fp} does {name} have now?"
        think = f"{name} starts with {a}. After buying {b} more: {a} + {b} = {s}. "
        think += f"After giving {c} away: {s} - {c} = {r}."
        return q, think, str(r)
    name = rng.choice(T.NAMES_ZH)
    q = f"{name}有{a}{m}{fz}，又买了{b}{m}，然后送给别人{c}{m}。{name}现在有几{m}{fz}？"
    think = f"{name}一开始有{a}{m}。买了{b}{m}后：{a} + {b} = {s}。送出{c}{m}后：{s} - {c} = {r}。"
    return q, think, str(r)


def _weekday(rng: random.Random, lang: Lang, pools: Pools) -> tuple[str, str, str]:
    i, k = rng.randrange(7), rng.randint(1, 6)
    steps = [T.DAYS[(i + j) % 7] for j in range(1, k + 1)]
    if lang == "en":
        d = T.DAYS[i][0]
        think = (
            f"Counting forward from {d}: " + ", ".join(f"{j} -> {s[0]}" for j, s in enumerate(steps, 1)) + "."
        )
        return f"What day is it {k} day{'s' * (k > 1)} after {d}?", think, steps[-1][0]
    d = T.DAYS[i][1]
    think = f"从{d}往后数：" + "，".join(f"第{j}天是{s[1]}" for j, s in enumerate(steps, 1)) + "。"
    return f"{d}之后的第{k}天是星期几？", think, steps[-1][1]


def _mixed_units(rng: random.Random, lang: Lang, pools: Pools) -> tuple[str, str, str]:
    u = rng.choice([x for x in T.UNITS if x.factor <= 100])
    n, extra = rng.randint(2, 9), rng.randint(2, u.factor - 1)  # >= 2 keeps English plurals right
    big = n * u.factor
    total = big + extra
    if lang == "en":
        q = f"How many {u.small_en} are in {n} {u.big_en_plural} and {extra} {u.small_en}?"
        f, small = u.factor, u.small_en
        think = f"One {u.big_en} is {f} {small}, so {n} {u.big_en_plural} is {n} * {f} = {big}. "
        think += f"Adding {extra} gives {big} + {extra} = {total}."
        return q, think, str(total)
    q = f"{n}{u.big_zh}{extra}{u.small_zh}一共是多少{u.small_zh}？"
    think = f"1{u.big_zh}等于{u.factor}{u.small_zh}，所以{n}{u.big_zh}是{n} × {u.factor} = {big}。"
    think += f"再加上{extra}，{big} + {extra} = {total}。"
    return q, think, str(total)


def _spelling(rng: random.Random, lang: Lang, pools: Pools) -> tuple[str, str, str]:
    w, _ = rng.choice(pools.words)
    letters = list(w)
    if rng.random() < 0.5:
        if lang == "en":
            think = f"Spell it out: {'-'.join(letters)}. Counting them gives {len(w)} letters."
            return f"How many letters does the word '{w}' have?", think, str(len(w))
        think = f"逐个拼写：{'-'.join(letters)}。数一数，一共{len(w)}个字母。"
        return f"单词“{w}”有几个字母？", think, str(len(w))
    if lang == "en":
        think = f"The letters are {', '.join(letters)}. Read from last to first: {', '.join(letters[::-1])}."
        return f"Reverse the word '{w}'.", think, w[::-1]
    think = f"字母依次是{'、'.join(letters)}。从后往前读：{'、'.join(letters[::-1])}。"
    return f"把单词“{w}”倒过来写。", think, w[::-1]


def _compare(rng: random.Random, lang: Lang, pools: Pools) -> tuple[str, str, str] | None:
    a, b = pools.arith.draw(rng, "+")
    c, d = pools.arith.draw(rng, "+")
    s1, s2 = a + b, c + d
    if s1 == s2:
        return None
    left, right = f"{a} + {b}", f"{c} + {d}"
    win, lose, big, small = (left, right, s1, s2) if s1 > s2 else (right, left, s2, s1)
    if lang == "en":
        think = f"{left} = {s1}. {right} = {s2}. {big} is larger than {small}, so {win} is larger."
        return f"Which is larger, {left} or {right}?", think, win
    think = f"{left} = {s1}，{right} = {s2}。{big}比{small}大，所以{win}更大。"
    return f"{left}和{right}哪个更大？", think, win


REASONING_KINDS = (
    (_two_step, 35),
    (_word_problem, 20),
    (_weekday, 12),
    (_mixed_units, 13),
    (_spelling, 10),
    (_compare, 10),
)


def reasoning(rng: random.Random, pools: Pools, n: int) -> list[dict]:
    """`<think>...</think><answer>...</answer>` replies for short multi-step problems (training side)."""

    def make(i: int) -> dict | None:
        lang = lang_of(i)
        kind = rng.choices([k for k, _ in REASONING_KINDS], weights=[w for _, w in REASONING_KINDS])[0]
        got = kind(rng, lang, pools)
        if got is None:
            return None
        q, think, answer = got
        msgs = [_msg("system", REASONING_SYSTEM[lang])] if rng.random() < 0.3 else []
        msgs += [_msg("user", q), _msg("assistant", f"<think>{think}</think><answer>{answer}</answer>")]
        return {"conversations": msgs}

    return _unique(n, make, key=lambda r: user_turns(r["conversations"]))


# ---------------------------------------------------------------- multiple choice


def _choice_item(rng: random.Random, lang: Lang) -> tuple[str, str, list[str]]:
    """(question, correct option, three distractors) about the table facts, C-Eval style blanks."""
    en = lang == "en"
    kind = rng.choice(
        ("capital", "capital", "continent", "symbol", "element", "planet", "sound", "unit", "opposite")
    )
    if kind in ("capital", "continent"):
        c = rng.choice(T.COUNTRIES)
        if kind == "capital":
            right = c.capital_en if en else c.capital_zh
            pool = [x.capital_en if en else x.capital_zh for x in T.COUNTRIES]
            q = f"The capital of {c.en} is ____." if en else f"{c.zh}的首都是____。"
        else:
            right = c.continent.en if en else c.continent.zh
            pool = [x.en if en else x.zh for x in T.CONTINENTS]
            q = f"{c.en} is located in ____." if en else f"{c.zh}位于____。"
    elif kind in ("symbol", "element"):
        e = rng.choice(T.ELEMENTS)
        if kind == "symbol":
            right, pool = e.symbol, [x.symbol for x in T.ELEMENTS]
            q = f"The chemical symbol of {e.en} is ____." if en else f"{e.zh}的化学符号是____。"
        else:
            right, pool = (e.en, [x.en for x in T.ELEMENTS]) if en else (e.zh, [x.zh for x in T.ELEMENTS])
            q = (
                f"The element with atomic number {e.number} is ____."
                if en
                else f"原子序数为{e.number}的元素是____。"
            )
    elif kind == "planet":
        p = rng.choice(T.PLANETS)
        right, pool = (p.en, [x.en for x in T.PLANETS]) if en else (p.zh, [x.zh for x in T.PLANETS])
        q = (
            f"The {T.ORDINALS_EN[p.order]} planet from the Sun is ____."
            if en
            else f"距离太阳第{T.zh_number(p.order)}近的行星是____。"
        )
    elif kind == "sound":
        a = rng.choice([x for x in T.ANIMALS if x.sound_en])
        right = a.sound_en if en else a.sound_zh
        pool = [x.sound_en if en else x.sound_zh for x in T.ANIMALS if x.sound_en]
        q = f"The sound the {a.en} makes is ____." if en else f"{a.zh}的叫声是____。"
    elif kind == "unit":
        u = rng.choice(T.UNITS)
        right = str(u.factor)
        pool = [str(f) for f in (7, 10, 12, 24, 60, 100, 1000, 365, 30, 500)]
        q = f"One {u.big_en} equals ____ {u.small_en}." if en else f"1{u.big_zh}等于____{u.small_zh}。"
    else:
        o = rng.choice(T.OPPOSITES)
        right, pool = (o[1], [x[1] for x in T.OPPOSITES]) if en else (o[3], [x[3] for x in T.OPPOSITES])
        q = f"The opposite of '{o[0]}' is ____." if en else f"“{o[2]}”的反义词是____。"
    distractors = rng.sample([x for x in dict.fromkeys(pool) if x != right], 3)
    return cap(q) if en else q, right, distractors


def choice(rng: random.Random, n: int) -> list[dict]:
    """Four-option questions; the correct letter is exactly balanced over A-D, then shuffled."""
    letters = [("A", "B", "C", "D")[i % 4] for i in range(n)]
    rng.shuffle(letters)

    def make(i: int) -> dict:
        q, right, wrong = _choice_item(rng, lang_of(i))
        options = list(wrong)
        slot = "ABCD".index(letters[i])
        options.insert(slot, right)
        return {
            "question": q,
            "A": options[0],
            "B": options[1],
            "C": options[2],
            "D": options[3],
            "answer": letters[i],
        }

    return _unique(n, make, key=lambda r: r["question"])
