"""`minimind agent`: agentic RL — GRPO over multi-turn episodes whose tool calls are executed during the rollout.

    minimind agent --data agent_rl.jsonl --init runs/sft --out runs/agent \
        [--tools tools.py --max-turns 3 --tool-timeout 5 --group-size 4 --max-new-tokens 64 --beta 0.04]

Data: JSON lines {"conversations": [{"role": "system", "content": ..., "tools": [schemas]}, {"role": "user", ...},
{"role": "assistant", ...}], "gt": [answers]} (the reference project's agent_rl shape; the last assistant turn is
dropped, a system turn without "tools" offers every tool of `--tools`). `--tools` is a Python file whose public
functions (or `TOOLS` list) are the tools; the default is the bundled calculator and unit converter
(minimind/examples/tools.py). Each episode: the policy writes a turn (until eos or `</tool_call>`); a call is run
in a worker process (killed after `--tool-timeout` s) and its result comes back as a tool turn; up to
`--max-turns` turns, the last of which must answer (`minimind/train/agent.py`).

Reward per episode: answer (the share of `gt` found in the final answer, the rule check of `--reward rule`) +
tool (+0.2 when every call parsed, named an offered tool and fit its schema; −0.2 per call that did not) + format
(−0.1 × repeated-3-gram share of the answer, −0.1 for tool-call tags left in it) − 0.5 when no final answer came
within the turns; an episode whose tool raised, hung or crashed scores −1. Each term is logged (reward_answer,
reward_tool, reward_format, reward_unfinished) with tool_calls, invalid_calls, failed, unfinished and turns per
episode. The loss is GRPO's (`stages/grpo.py`) over the model's own tokens; tool turns are masked out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from minimind.errors import UserError
from minimind.modeldir import load_model_dir, save_model_dir
from minimind.records import ReadStats
from minimind.train.agent import (
    AgentDataset,
    AgentRewardWeights,
    AgentScored,
    agent_batch,
    read_agent_data,
    roll_out_episodes,
)
from minimind.train.agent_tools import Tool, ToolRunner, load_tools
from minimind.train.args import TrainConfig, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.reference import load_frozen, unwrap
from minimind.train.rl import RL_DEFAULTS, held_out_numbers
from minimind.train.rollout import sample
from minimind.train.stages import run_stage
from minimind.train.stages.grpo import GRPO, GRPOOptions
from minimind.train.stages.grpo import add_arguments as add_grpo_arguments
from minimind.train.trainer import StageRun

DEFAULT_TOOLS = str(Path(__file__).resolve().parents[2] / "examples" / "tools.py")
DEFAULTS = {**RL_DEFAULTS, "max_seq_len": 512}


@dataclass
class AgentOptions(GRPOOptions):
    """GRPO's options plus the tools file, the turn limit and the tool timeout."""

    tools: str = DEFAULT_TOOLS
    max_turns: int = 3
    tool_timeout: float = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_grpo_arguments(parser)
    g = parser.add_argument_group("tools and episodes")
    g.add_argument("--tools", default=AgentOptions.tools,
                   help="Python file whose public functions (or TOOLS list) are the tools (default: the bundled "
                        "calculator and unit converter, minimind/examples/tools.py)")
    g.add_argument("--max-turns", type=int, default=AgentOptions.max_turns,
                   help="model turns per episode, the final answer's included")
    g.add_argument("--tool-timeout", type=float, default=AgentOptions.tool_timeout,
                   help="seconds a tool call may run before it is killed (the episode then scores as failed)")
    parser.set_defaults(**{k: v for k, v in DEFAULTS.items() if k in ("max_seq_len",)}, max_new_tokens=64)


def run(args: argparse.Namespace) -> int:
    if args.group_size < 2:
        raise UserError(f"--group-size must be at least 2 for group-normalised advantages, got {args.group_size}")
    if args.max_turns < 1:
        raise UserError(f"--max-turns must be at least 1, got {args.max_turns}")
    if args.tool_timeout <= 0:
        raise UserError(f"--tool-timeout must be positive, got {args.tool_timeout}")
    if args.reward != "rule":
        raise UserError(f"--reward {args.reward}: minimind agent scores episodes with its own reward terms (answer, "
                        "tool use, format, unfinished); leave --reward out")
    load_tools(args.tools)  # a tools file that does not import is reported before anything is written
    for path in filter(None, (args.data, args.eval_data)):
        stats = ReadStats()
        read_agent_data(path, args.skip_bad_lines, stats)
        if stats.skipped:
            print(stats.summary(path))
    return run_stage(config_from_args(args, "agent", AgentOptions.from_args(args)), build)


class AgentGRPO(GRPO):
    """GRPO whose rollouts are multi-turn tool-using episodes (`train/agent.py`); the loss is GRPO's, over the
    model's own tokens (the Rollout's completion_mask leaves the tool turns out)."""

    def __init__(self, reference: torch.nn.Module, tokenizer, tools: dict[str, Tool], runner: ToolRunner,
                 options: AgentOptions, weights: AgentRewardWeights | None = None):
        super().__init__(reference, tokenizer, None, options)
        self.tools, self.runner, self.max_turns = tools, runner, options.max_turns
        self.weights = weights or AgentRewardWeights()

    def roll_out(self, model: torch.nn.Module, batch: dict, group_size: int, temperature: float) -> AgentScored:
        """`group_size` episodes per prompt, scored by the agent reward terms."""
        return roll_out_episodes(unwrap(model), self.tokenizer, batch, self.tools, self.runner, group_size,
                                 self.max_turns, self.max_new_tokens, temperature, self.top_k, self.weights,
                                 partial(sample, compile=self.compile_rollouts, dtype=self.rollout_dtype))

    def rollout_metrics(self, scored: AgentScored) -> dict[str, float]:
        """GRPO's rollout numbers plus each reward term and the tool-use counts, averaged over episodes."""
        return {**super().rollout_metrics(scored), **{k: v.mean().item() for k, v in scored.terms.items()}}


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    options = cfg.stage_options(AgentOptions)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_dir(cfg.init)
    tools = load_tools(options.tools)
    reference = load_frozen(cfg.init, info.device)
    dataset = AgentDataset(read_agent_data(cfg.data, cfg.skip_bad_lines), tokenizer, tools, cfg.max_seq_len)
    eval_dataset = None
    if cfg.eval_data:
        eval_dataset = AgentDataset(read_agent_data(cfg.eval_data, cfg.skip_bad_lines), tokenizer, tools,
                                    cfg.max_seq_len)

    def collate(items: list[dict]) -> dict:
        return agent_batch(items, tokenizer.pad_token_id)

    objective = AgentGRPO(reference, tokenizer, tools, ToolRunner(options.tools, options.tool_timeout), options)
    return StageRun(
        model=model.train(), objective=objective, dataset=dataset, collate=collate,
        save_final=lambda m, out: save_model_dir(m, tokenizer, out), eval_dataset=eval_dataset,
        final_numbers=held_out_numbers(objective, cfg, eval_dataset, collate, reference, info.device),
        notes=[f"Agentic RL: G = {options.group_size} episodes per prompt, ≤ {options.max_turns} turns of ≤ "
               f"{options.max_new_tokens} tokens (temperature {options.temperature:g}), tools {sorted(tools)} from "
               f"{options.tools} (timeout {options.tool_timeout:g} s), β = {options.beta:g}, clip ε = "
               f"{options.clip:g}; tool turns are masked out of the loss. Held-out numbers: greedy episodes, and "
               "G sampled episodes per prompt at the rollout temperature; accuracy = every gt item in the final "
               "answer."],
    )
