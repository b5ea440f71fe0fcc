"""minimind-3's tokenizer format: `minimind tokenizer --template minimind3`, its chat template (the rendered bytes
below are what minimind-3's own template renders for the same messages), and the SFT/DPO loss mask with it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from minimind.cli import main
from minimind.data.chat import drop_empty_think, encode_conversation, encode_prompt
from minimind.errors import UserError
from minimind.tokenizer import load_tokenizer
from minimind.tokenizer.template import CHAT_TEMPLATE, MINIMIND3_CHAT_TEMPLATE, MINIMIND3_SPECIAL_TOKENS
from minimind.tokenizer.train import save_tokenizer, texts_from_jsonl, train_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
# One assistant turn thinks and makes two calls (arguments as an object and as JSON text), two tool results
# follow (merged into one user turn), and a last answer comes without reasoning.
TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking.", "reasoning_content": "Two cities, two calls.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"name": "get_weather", "arguments": '{"city": "Rome"}'}]},
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "Paris is sunny, Rome rainy."},
]
CALLS = ('\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
         '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
TOOL_CHAT_TEXT = (
    "<|im_start|>system\nBe brief.\n\n" + TOOLS_BLOCK + "<|im_end|>\n"
    "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nTwo cities, two calls.\n</think>\n\nChecking." + CALLS + "<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nParis is sunny, Rome rainy.<|im_end|>\n"
)
THINK_CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
              {"role": "user", "content": "and 3+3?"}]
THINK_CHAT_TEXT = ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n"
                   "<|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n")


def minimind3_tokenizer(out: Path, corpus_file: Path):
    """A tiny tokenizer of minimind-3's format trained into `out` and loaded (its directory: `.name_or_path`)."""
    trained = train_tokenizer(texts_from_jsonl(corpus_file), vocab_size=512, show_progress=False, template="minimind3")
    return load_tokenizer(save_tokenizer(trained, out, template="minimind3"))


@pytest.fixture(scope="module")
def m3(tmp_path_factory, corpus_file):
    return minimind3_tokenizer(tmp_path_factory.mktemp("tokenizer3"), corpus_file)


@pytest.fixture(scope="module")
def m3_dir(m3):
    return Path(m3.name_or_path)


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


# ---- the trained tokenizer ----------------------------------------------------------------------------------
def test_added_tokens_have_minimind3_ids_flags_and_markers(m3_dir, m3):
    assert [m3.convert_ids_to_tokens(i) for i in range(36)] == MINIMIND3_SPECIAL_TOKENS
    assert MINIMIND3_SPECIAL_TOKENS[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert MINIMIND3_SPECIAL_TOKENS[21:27] == ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                                               "<think>", "</think>"]
    config = json.loads((m3_dir / "tokenizer_config.json").read_text())
    flags = {int(i): entry["special"] for i, entry in config["added_tokens_decoder"].items()}
    assert flags == {i: i < 21 for i in range(36)}  # <tool_call> … <|buffer9|> are plain added tokens
    saved = json.loads((m3_dir / "tokenizer.json").read_text())["added_tokens"]
    assert [(t["id"], t["content"], t["special"]) for t in saved] == [
        (i, tok, i < 21) for i, tok in enumerate(MINIMIND3_SPECIAL_TOKENS)]
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    assert (m3.bos_token_id, m3.eos_token_id, m3.pad_token_id) == (1, 2, 0)
    assert config["chat_template"] == MINIMIND3_CHAT_TEMPLATE == m3.chat_template
    # each marker is one token, and decoding without specials keeps the think and tool tags
    ids = m3("<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>{}</tool_call><|im_end|>",
             add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and 25 in ids and 26 in ids and 21 in ids and 22 in ids
    assert m3.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\n<tool_call>{}</tool_call>"


def test_cli_template_flag_and_the_default_stays_ours(tmp_path, corpus_file):
    assert main(["tokenizer", "--data", str(corpus_file), "--vocab-size", "400", "--template", "minimind3",
                 "--out", str(tmp_path / "m3")]) == 0
    assert main(["tokenizer", "--data", str(corpus_file), "--vocab-size", "400", "--out", str(tmp_path / "ours")]) == 0
    m3, ours = load_tokenizer(tmp_path / "m3"), load_tokenizer(tmp_path / "ours")
    assert len(m3) == len(ours) == 400
    assert m3.chat_template == MINIMIND3_CHAT_TEMPLATE and m3.eos_token == "<|im_end|>"
    assert ours.chat_template == CHAT_TEMPLATE and (ours.bos_token, ours.eos_token, ours.unk_token) == (
        "<s>", "</s>", "<unk>")
    with pytest.raises(SystemExit):
        main(["tokenizer", "--data", str(corpus_file), "--template", "llama", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="greater than 292"):
        train_tokenizer(["abc"], vocab_size=292, show_progress=False, template="minimind3")


def test_a_saved_minimind3_template_is_kept_on_load(tmp_path, m3):
    """load_tokenizer upgrades only our own earlier templates; a directory carrying minimind-3's keeps it."""
    m3.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.chat_template == MINIMIND3_CHAT_TEMPLATE
    assert render(loaded, THINK_CHAT, add_generation_prompt=True) == THINK_CHAT_TEXT + "<think>\n\n</think>\n\n"


# ---- the template: rendered bytes ---------------------------------------------------------------------------
def test_plain_chat_without_system_has_no_default_system(m3):
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert render(m3, chat) == (
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n你好！<|im_end|>\n")


def test_system_and_multi_turn_with_reasoning(m3):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "\nb", "reasoning_content": "\nr\n\n"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    assert render(m3, chat) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr\n</think>\n\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nd<|im_end|>\n")


def test_tools_calls_and_merged_tool_results(m3):
    assert render(m3, TOOL_CHAT, tools=[WEATHER]) == TOOL_CHAT_TEXT
    # tools without a system turn open their own; a call with no text has no newline before it
    chat = [{"role": "user", "content": "w?"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {}}}]}]
    assert render(m3, chat, tools=[WEATHER]) == (
        "<|im_start|>system\n" + TOOLS_BLOCK + "<|im_end|>\n<|im_start|>user\nw?<|im_end|>\n"
        '<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n'
        "</tool_call><|im_end|>\n")


def test_think_in_content_and_the_thinking_switch(m3):
    assert render(m3, THINK_CHAT, add_generation_prompt=True) == THINK_CHAT_TEXT + "<think>\n\n</think>\n\n"
    assert render(m3, THINK_CHAT, add_generation_prompt=True, open_thinking=True) == THINK_CHAT_TEXT + "<think>\n"
    assert render(m3, THINK_CHAT, add_generation_prompt=True, enable_thinking=True) == THINK_CHAT_TEXT + "<think>\n"
    for off in ({"open_thinking": False}, {"enable_thinking": False},
                {"open_thinking": False, "enable_thinking": True}):  # minimind-3's own name decides
        assert render(m3, THINK_CHAT, add_generation_prompt=True, **off) == THINK_CHAT_TEXT + "<think>\n\n</think>\n\n"
    assert render(m3, THINK_CHAT) == THINK_CHAT_TEXT.rsplit("<|im_start|>assistant\n", 1)[0]


# ---- the loss mask ------------------------------------------------------------------------------------------
def learned_runs(tokenizer, ids, mask) -> list[str]:
    """The text of each contiguous run of learned tokens."""
    runs, current = [], []
    for token, learn in zip(ids + [None], mask + [0]):
        if learn:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_mask_learns_reply_think_block_and_im_end_only(m3):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning_content": "r"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    ids, mask = encode_conversation(m3, chat)
    assert m3.decode(ids) == render(m3, chat)
    assert learned_runs(m3, ids, mask) == ["<think>\nr\n</think>\n\nb<|im_end|>", "<think>\n\n</think>\n\nd<|im_end|>"]


def test_mask_with_tools_leaves_preamble_and_tool_results_out(m3):
    record = [dict(TOOL_CHAT[0], functions=[WEATHER]), *TOOL_CHAT[1:]]  # the records reader's form of tools
    ids, mask = encode_conversation(m3, record)
    assert m3.decode(ids) == TOOL_CHAT_TEXT
    assert learned_runs(m3, ids, mask) == [
        "<think>\nTwo cities, two calls.\n</think>\n\nChecking." + CALLS + "<|im_end|>",
        "<think>\n\n</think>\n\nParis is sunny, Rome rainy.<|im_end|>"]
    prompt = m3.decode(encode_prompt(m3, record[:2]))
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and prompt.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_mask_without_empty_think_blocks(m3):
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d", "reasoning_content": "r"}]
    ids, mask = encode_conversation(m3, chat, no_empty_think=True)
    assert m3.decode(ids) == ("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
                              "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nd<|im_end|>\n")
    assert learned_runs(m3, ids, mask) == ["b<|im_end|>", "<think>\nr\n</think>\n\nd<|im_end|>"]


def test_drop_empty_think_moves_spans():
    block = "<think>\n\n</think>\n\n"
    text = f"P{block}A|Q{block}B|"
    spans = [(1, 1 + len(block) + 2), (len(text) - len(block) - 2, len(text))]
    assert drop_empty_think(text, spans) == ("PA|QB|", [(1, 3), (4, 6)])
    assert drop_empty_think("no blocks", [(0, 2)]) == ("no blocks", [(0, 2)])


def test_the_default_template_masks_as_before(tokenizer):
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"}]
    ids, mask = encode_conversation(tokenizer, chat)
    assert learned_runs(tokenizer, ids, mask) == ["<think>r</think><answer>b</answer></s>"]


@pytest.mark.parametrize("template, error", [
    # the reply is not closed by the eos token: the model would never learn to stop
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
     "does not close an assistant turn with the eos token '<|im_end|>'"),
    # the generation prompt names a role the rendered turns do not use
    ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + eos_token }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>model\\n' }}{% endif %}",
     "generation prompt '<\\|im_start\\|>model\\\\n' does not open the assistant turns it renders"),
])
def test_a_template_without_the_markers_the_mask_needs_is_one_error(m3, template, error):
    broken = copy.deepcopy(m3)
    broken.chat_template = template
    with pytest.raises(UserError, match=error):
        encode_conversation(broken, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
