"""Agentic RL's pieces: the agent_rl data, multi-turn rollouts that execute tool calls, and the reward terms.

An episode starts from a prompt (the data's conversation without its last assistant turn, rendered with the tools
by the chat template). Each turn the policy samples (`rollout.sample`, batched over every episode still running)
until eos or its first `</tool_call>`; a turn holding a `<tool_call>{json}</tool_call>` block is parsed
(`tokenizer/tool_calls.py`, the inverse of the template's rendering), checked against the tool's schema, run by a
`ToolRunner` and answered with a tool turn rendered by the chat template. A turn without a call is the final
answer. After `max_turns` turns an episode that is still calling tools is unfinished.

The trained sequence of an episode is its prompt, then every turn's tokens in order; the model's own tokens have
completion_mask 1 (and their sampling log-probs), the tool turns and the template's wrapping around them 0, so
only what the model wrote is trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from minimind.errors import UserError
from minimind.records import ReadStats, offered_functions
from minimind.sources import is_line, iter_items
from minimind.tokenizer.template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from minimind.tokenizer.tool_calls import parse_tool_calls
from minimind.train.agent_tools import Tool, ToolRunner
from minimind.train.rewards import answer_correct, repetition
from minimind.train.rollout import Rollout, Scored, left_pad

_SENTINEL = "\u2063MINIMIND_TURN_END\u2063"  # stands in for the model's turn when rendering what follows it


@dataclass
class AgentRewardWeights:
    """The reward terms' weights (see `score_episode`)."""

    answer: float = 1.0  # × the share of `gt` items found in the final answer
    tool: float = 0.2  # + when every call was valid (and there was one); − per invalid call
    format: float = 0.1  # − per repeated-3-gram share of the final answer and for tool-call tags left in it
    unfinished: float = 0.5  # − when no final answer came within the turns and tokens allowed
    failed: float = -1.0  # the whole reward of an episode whose tool raised, timed out or crashed


@dataclass
class Episode:
    """One multi-turn rollout: the prompt's tokens, then turn tokens (model's and tool turns') in order."""

    prompt: list[int]
    tools: dict[str, Tool]
    answer: list[str]
    ids: list[int] = field(default_factory=list)
    train: list[int] = field(default_factory=list)  # 1 on the model's tokens
    logprobs: list[float] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)  # the model's text of each turn
    final: str | None = None  # the final answer's text; None while calling tools / unfinished
    final_ids: list[int] = field(default_factory=list)
    valid_calls: int = 0
    invalid_calls: int = 0
    failed: bool = False
    done: bool = False

    def add(self, ids: list[int], logprobs: list[float] | None) -> None:
        """Append the model's tokens (with their log-probs) or, with None, tokens it did not write."""
        self.ids += ids
        self.train += [1 if logprobs is not None else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


def read_agent_data(path: str | Path, skip_bad_lines: bool = False, stats: ReadStats | None = None) -> list[dict]:
    """agent_rl JSONL -> [{"messages", "tools", "gt"}]: a line is {"conversations": [{"role", "content"}, ...],
    "gt": [answers]} (the reference project's shape); tools come from the system turn's "tools" (JSON text or a
    list), the last assistant turn (the reference reply) is dropped. A bad line is one error naming file:line, or
    with `skip_bad_lines` is counted in `stats`."""
    records, stats = [], stats if stats is not None else ReadStats()
    for where, number, payload in iter_items(path):  # JSONL (.gz, .zst), Parquet, a directory, glob or hf:
        if is_line(payload) and not payload.strip():
            continue
        try:
            records.append(_agent_record(payload))
            stats.good += 1
        except (ValueError, UnicodeDecodeError) as err:
            stats.reject(where, number, str(err), skip_bad_lines, unit="line" if is_line(payload) else "row")
    if not records:
        raise UserError(f"{path}: no agent_rl records (expected JSON lines with 'conversations' and 'gt')"
                        + (f" ({stats.skipped} bad lines skipped)" if stats.skipped else ""))
    return records


def _agent_record(line: bytes | dict) -> dict:
    record = json.loads(line) if isinstance(line, bytes) else line  # a JSONDecodeError is a ValueError
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ValueError("expected a JSON object with a 'conversations' list of {'role', 'content'} turns")
    messages, tools = [], None
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant", "tool") \
                or not isinstance(turn.get("content", ""), str):
            raise ValueError("each turn needs a 'role' (system/user/assistant/tool) and a string 'content'")
        turn = dict(turn)
        if turn["role"] == "system" and turn.get("tools"):
            tools = turn.pop("tools")
            tools = offered_functions(tools, "the system turn's 'tools'")  # a list of schemas, or its JSON text
        messages.append(turn)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the reference reply: the policy writes its own
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("'conversations' has no user turn")
    gt = record.get("gt")
    gt = [gt] if isinstance(gt, (str, int, float)) and not isinstance(gt, bool) else gt
    if not isinstance(gt, list) or not gt or not all(isinstance(g, (str, int, float)) for g in gt):
        raise ValueError("expected 'gt': a non-empty list of reference answers (strings or numbers)")
    return {"messages": messages, "tools": tools, "gt": [str(g) for g in gt]}


class AgentDataset(Dataset):
    """agent_rl records with their first-turn prompt tokens (cut from the left to `max_prompt_len`)."""

    def __init__(self, records: list[dict], tokenizer, tools: dict[str, Tool], max_prompt_len: int):
        self.items = []
        for record in records:
            schemas = record["tools"] or [tool.schema for tool in tools.values()]
            text = tokenizer.apply_chat_template(record["messages"], tools=schemas, add_generation_prompt=True,
                                                 tokenize=False)
            ids = tokenizer.encode(text, add_special_tokens=False)
            offered = {_schema_name(s) for s in schemas}
            self.items.append({"prompt_ids": list(ids)[-max_prompt_len:], "answer": record["gt"],
                               "tools": sorted(offered)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _schema_name(schema: dict) -> str:
    return (schema.get("function") or schema).get("name", "")


def agent_batch(items: list[dict], pad_id: int) -> dict:
    """Collate: left-padded first-turn prompts, the reference answers and the tools each prompt offers."""
    ids, mask = left_pad([item["prompt_ids"] for item in items], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "answer": [item["answer"] for item in items],
            "tools": [item["tools"] for item in items]}


def cut_at_call_end(tokenizer, ids: list[int]) -> int:
    """How many of a turn's tokens to keep: through the one that completes the first `</tool_call>` (and the eos
    right after it, the turn's end as the template writes it), or all."""
    if TOOL_CALL_CLOSE not in tokenizer.decode(ids, skip_special_tokens=False):
        return len(ids)
    for k in range(1, len(ids) + 1):
        if TOOL_CALL_CLOSE in tokenizer.decode(ids[:k], skip_special_tokens=False):
            return k + 1 if k < len(ids) and ids[k] == tokenizer.eos_token_id else k
    return len(ids)


def tool_turn_text(tokenizer, results: list[str], closed_by_eos: bool) -> str:
    """What the chat template writes after an assistant turn: its end, the tool turns holding `results` and the
    next assistant turn's opening. Found by rendering a stand-in turn and keeping what follows it."""
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    messages += [{"role": "tool", "content": r} for r in results]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rest = text[text.index(_SENTINEL) + len(_SENTINEL) :]
    if closed_by_eos and rest.startswith(tokenizer.eos_token):  # the model already wrote the turn's end
        rest = rest[len(tokenizer.eos_token) :]
    return rest


def run_calls(episode: Episode, text: str, offered: list[str], runner: ToolRunner) -> list[str]:
    """Parse and run the calls of a turn; -> each tool turn's text. Counts valid and invalid calls; an invalid
    call is answered with what was wrong, a tool that raised, hung or crashed fails the episode."""
    parsed = parse_tool_calls(text)
    if parsed is None:
        episode.invalid_calls += 1
        return [json.dumps({"error": "the tool call does not parse: expected <tool_call>{\"name\": ..., "
                                     "\"arguments\": {...}}</tool_call>"})]
    results = []
    for call in parsed[1]:
        tool = episode.tools.get(call.name) if call.name in offered else None
        arguments = json.loads(call.arguments)
        problem = f"unknown tool {call.name!r}" if tool is None else tool.check(arguments)
        if problem:
            episode.invalid_calls += 1
            results.append(json.dumps({"error": problem}, ensure_ascii=False))
            continue
        episode.valid_calls += 1
        result = runner.call(call.name, arguments)
        episode.failed |= result.failed
        results.append(result.text)
    return results


def score_episode(episode: Episode, weights: AgentRewardWeights) -> dict[str, float]:
    """The reward terms of a finished episode, and `reward` (their sum, or `weights.failed` if a tool failed)
    and `correct` (every gt item in the final answer)."""
    final = episode.final or ""
    found = sum(answer_correct(final, g) for g in episode.answer) / len(episode.answer) if episode.final else 0.0
    calls = episode.valid_calls + episode.invalid_calls
    tool = weights.tool * float(calls > 0 and episode.invalid_calls == 0) - weights.tool * episode.invalid_calls
    stray = TOOL_CALL_OPEN in final or TOOL_CALL_CLOSE in final
    form = -weights.format * (repetition(episode.final_ids) + float(stray))
    unfinished = -weights.unfinished * float(episode.final is None and not episode.failed)
    terms = {"reward_answer": weights.answer * found, "reward_tool": tool, "reward_format": form,
             "reward_unfinished": unfinished}
    total = weights.failed if episode.failed else sum(terms.values())
    return {**terms, "reward": total, "correct": float(found == 1.0 and not episode.failed)}


@dataclass
class AgentScored(Scored):
    """Scored multi-turn rollouts, with each reward term (N,) and per-episode tool-call counts."""

    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def roll_out_episodes(model: torch.nn.Module, tokenizer, batch: dict, tools: dict[str, Tool], runner: ToolRunner,
                      group_size: int, max_turns: int, max_new_tokens: int, temperature: float, top_k: int,
                      weights: AgentRewardWeights, sample_fn) -> AgentScored:
    """`group_size` episodes per prompt (a prompt's group in consecutive rows); see the module docstring.

    `sample_fn(model, ids, mask, max_new_tokens, eos, pad, temperature, top_k)` samples one turn for a batch of
    left-padded contexts (`rollout.sample`).
    """
    device = batch["input_ids"].device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    episodes = [Episode(prompt, tools, answer) for prompt, answer in zip(prompts, batch["answer"])
                for _ in range(group_size)]
    offered = [names for names in batch["tools"] for _ in range(group_size)]
    for turn in range(max_turns):
        alive = [i for i, e in enumerate(episodes) if not e.done]
        if not alive:
            break
        ids, mask = left_pad([episodes[i].prompt + episodes[i].ids for i in alive], pad)
        sampled = sample_fn(model, ids.to(device), mask.to(device), max_new_tokens, eos, pad, temperature, top_k)
        lengths = sampled.lengths().tolist()
        new_ids, new_logps = sampled.completion_ids.tolist(), sampled.logprobs.tolist()
        for row, i in enumerate(alive):
            episode = episodes[i]
            keep = cut_at_call_end(tokenizer, new_ids[row][: int(lengths[row])])
            tokens = new_ids[row][:keep]
            episode.add(tokens, new_logps[row][:keep])
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            episode.turns.append(text)
            if TOOL_CALL_OPEN not in text:  # no call: the final answer, if the turn ended
                episode.done = True
                if tokens and tokens[-1] == eos:
                    episode.final, episode.final_ids = text, tokens
                continue
            if turn == max_turns - 1:  # still calling tools when the turns run out: unfinished
                episode.done = True
                continue
            results = run_calls(episode, text, offered[i], runner)
            observation = tool_turn_text(tokenizer, results, closed_by_eos=bool(tokens) and tokens[-1] == eos)
            episode.add(tokenizer.encode(observation, add_special_tokens=False), None)
            episode.done = episode.failed
    return _scored(episodes, batch["input_ids"].repeat_interleave(group_size, 0),
                   batch["attention_mask"].repeat_interleave(group_size, 0), tokenizer, weights)


def _scored(episodes: list[Episode], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokenizer,
            weights: AgentRewardWeights) -> AgentScored:
    """Episodes -> one Rollout (the left-padded prompts, then each episode's turns, right-padded) and scores."""
    device = prompt_ids.device
    width = max(1, max(len(e.ids) for e in episodes))
    n = len(episodes)
    turns = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    attention, train = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width, dtype=torch.long)
    logprobs = torch.zeros(n, width)
    for row, e in enumerate(episodes):
        k = len(e.ids)
        turns[row, :k] = torch.tensor(e.ids, dtype=torch.long)
        attention[row, :k] = 1
        train[row, :k] = torch.tensor(e.train, dtype=torch.long)
        logprobs[row, :k] = torch.tensor(e.logprobs)
    scores = [score_episode(e, weights) for e in episodes]
    rollout = Rollout(
        sequences=torch.cat([prompt_ids, turns.to(device)], dim=1),
        attention_mask=torch.cat([prompt_mask, attention.to(device)], dim=1),
        completion_mask=train.to(device), logprobs=logprobs.to(device),
        finished=torch.tensor([e.final is not None for e in episodes], device=device),
        prompt_len=prompt_ids.shape[1])
    column = {key: torch.tensor([s[key] for s in scores], device=device) for key in scores[0]}
    terms = {key: value for key, value in column.items() if key.startswith("reward_")}
    terms["tool_calls"] = torch.tensor([float(e.valid_calls + e.invalid_calls) for e in episodes], device=device)
    terms["invalid_calls"] = torch.tensor([float(e.invalid_calls) for e in episodes], device=device)
    terms["failed"] = torch.tensor([float(e.failed) for e in episodes], device=device)
    terms["unfinished"] = torch.tensor([float(e.final is None and not e.failed) for e in episodes], device=device)
    terms["turns"] = torch.tensor([float(len(e.turns)) for e in episodes], device=device)
    texts = [e.final if e.final is not None else (e.turns[-1] if e.turns else "") for e in episodes]
    return AgentScored(rollout, texts, column["reward"], column["correct"], terms)
