"""OpenAI request bodies for the API server: schemas, validation, and the mapping to `SamplingParams`.

These models are the one description of the request protocol: the handlers take them as typed bodies, and the
OpenAPI document is generated from them. A chat turn is one model per role (chosen by "role"), its content a
string or a list of content parts; `response_format` is one model per "type". A check no type can express
(`check_supported`, run by each handler) refuses with the same 400 JSON.

Validation follows OpenAI and vLLM: every client error becomes an `APIError` that the app turns into
`{"error": {"message", "type", "param", "code"}}` with its HTTP status. Schema violations (wrong type, value
out of range, missing field, wrong role) are 400 like OpenAI and vLLM answer them, not FastAPI's default 422.
Unknown fields are ignored, as OpenAI does; fields we cannot honour (`suffix`, `best_of` other than n) are
rejected rather than silently dropped, so a client never gets an answer that quietly differs from what it
asked for. Function calling (`tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and `tool`
turns in the history) goes through the chat template and `serve/tools.py`. `response_format` json_object /
json_schema, and tool_choice "required" or a named function, constrain decoding with a grammar
(`infer/grammar.py`): the reply parses (and fits the schema) unless max_tokens cuts it short. `logprobs`
(chat: `logprobs` + `top_logprobs`; text completions: `logprobs: k`, with `echo` the prompt's tokens too) are
reported as `serve/logprobs.py` describes.

Besides OpenAI's fields the requests accept vLLM's sampling extensions `top_k`, `min_p`,
`repetition_penalty` and `ignore_eos`, and its guided decoding fields `guided_json`, `guided_regex`,
`guided_choice` and `guided_grammar` (one per request; the chat's JSON `response_format` and required tool
calls are constraints of the same kind), and vLLM's `chat_template_kwargs`: extra variables for the chat
template, such as the thinking switch (`{"open_thinking": true}` for minimind-3's template, `{"enable_thinking":
false}` for Qwen3's); a template without the variable ignores it. Fields left out take the model's
generation_config.json defaults (as `minimind generate` does; temperature 1.0 when the file has none);
`max_tokens` defaults to the rest of the context, capped by the generation config's `max_new_tokens`. With `seed` and several choices, choice i
(counted over all prompts of a completions request) uses seed + i, so every choice is reproducible alone.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema

from minimind.errors import UserError
from minimind.infer.grammar import (
    choice_grammar,
    json_grammar,
    lark_grammar,
    regex_grammar,
    tool_call_grammar,
)
from minimind.infer.sampling import MAX_LOGPROBS, SamplingParams

MAX_CHOICES = 16  # n per prompt
MAX_STOP_STRINGS = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Names a request's chat_template_kwargs may not set: apply_chat_template's own parameters and what it already
# hands the template (the conversation, tools, special tokens, helper functions)
RESERVED_TEMPLATE_NAMES = frozenset({
    "conversation", "conversations", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "bos_token", "eos_token",
    "unk_token", "sep_token", "pad_token", "cls_token", "mask_token", "additional_special_tokens",
    "raise_exception", "strftime_now",
})
MAX_TEMPLATE_KWARGS = 64


class APIError(Exception):
    """A client error (or a refusal) with its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        """OpenAI's error JSON."""
        detail = ErrorDetail(message=self.message, type=self.kind, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


class ErrorDetail(BaseModel):
    """The fields of an error: what went wrong, its kind, the request field at fault, a machine code."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


class _Body(BaseModel):
    """Strict types (no "0.5" for a number, no 1 for a string); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class CalledFunction(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it back


class MessageToolCall(_Body):
    """A call an earlier assistant turn made (OpenAI's `tool_calls` entries)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class TextPart(_Body):
    """A content part holding text, the one kind this model reads. Another kind of part is a model like this
    one with its own `type` literal, joined to this one in a union discriminated by "type"."""

    type: Literal["text"]
    text: str


def text_parts(*kinds: str) -> BeforeValidator:
    """Checks a content field before its type does: a string, or a list of parts whose "type" is one of `kinds`
    (the first named in the message), each with a string "text"; anything else is refused with a message
    saying what this model reads (pydantic's would name a member of the union)."""

    def check(value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            for part in value:
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError('a content part must be an object with a "type"')
                if part["type"] not in kinds:
                    raise ValueError(f"content part type {part['type']!r} is not supported; this model reads text")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f'a "{part["type"]}" content part needs a string "text"')
            return value
        raise ValueError(f'expected a string or a list of {{"type": "{kinds[0]}", "text": ...}} parts')

    return BeforeValidator(check)


# a turn's content: a string, or OpenAI's list of content parts (joined by `joined`)
Content = Annotated[str | list[TextPart], text_parts("text")]


def joined(content: str | list) -> str:
    """The text of a checked content field: the string, or its parts' texts joined."""
    return content if isinstance(content, str) else "".join(part.text for part in content)


class _Turn(_Body):
    """What every chat turn has: a `role` and `content` (declared by each turn, in the order its checks read them)."""

    def for_template(self) -> dict:
        """The turn as the chat template reads it (OpenAI's "developer" role is the system role)."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": "" if self.content is None else joined(self.content)}


class _PlainTurn(_Turn):
    """A turn that is not the assistant's: content required, no `tool_calls`."""

    content: Content
    tool_calls: SkipJsonSchema[None] = None

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _calls_from_the_assistant(cls, value: Any) -> None:
        if value:
            raise ValueError("only an assistant turn can have tool_calls")
        return None


class SystemTurn(_PlainTurn):
    role: Literal["system"]


class DeveloperTurn(_PlainTurn):
    """OpenAI's newer name for the system turn."""

    role: Literal["developer"]


class UserTurn(_PlainTurn):
    role: Literal["user"]


class ToolTurn(_PlainTurn):
    """A function's result, answering the call `tool_call_id` of the assistant turn before it."""

    role: Literal["tool"]
    tool_call_id: str | None = None


class AssistantTurn(_Turn):
    """An earlier reply; with `tool_calls` its content may be null."""

    role: Literal["assistant"]
    tool_calls: list[MessageToolCall] | None = None  # before content: content's check reads it
    content: Content | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_or_calls(cls, value: str | list | None, info: ValidationInfo) -> str | list | None:
        if value is None and not info.data.get("tool_calls"):
            raise ValueError("content is required (null only on an assistant turn with tool_calls)")
        return value

    def for_template(self) -> dict:
        turn = super().for_template()
        if self.tool_calls:
            turn["tool_calls"] = [{"type": "function", "function": call.function.model_dump()}
                                  for call in self.tool_calls]
        return turn


# one chat turn, its model chosen by "role"
Message = Annotated[SystemTurn | DeveloperTurn | UserTurn | AssistantTurn | ToolTurn, Field(discriminator="role")]


def _json_grammar(schema: dict | str, param: str) -> str:
    """The grammar of JSON valid under a request's schema; one llguidance cannot take (a number past 64 bits)
    is that field's 400."""
    try:
        return json_grammar(schema)
    except ValueError as err:
        raise APIError(400, f"{param}: the JSON schema cannot be used: {err}", param) from None


def _stop_strings(value: Any) -> list[str]:
    """`stop` as the list of strings it names (null: none)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        return value
    raise ValueError("expected a string or a list of strings")


StopInput = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None


class _GenerationRequest(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None  # optional: the server's (first) model
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    # a string or up to MAX_STOP_STRINGS of them; held as the list
    stop: Annotated[list[str], BeforeValidator(_stop_strings, json_schema_input_type=StopInput)] = Field(
        default_factory=list)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)  # token id (a string, as JSON keys are)
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)  # -1 or 0 = off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    # vLLM's guided decoding: the output follows a JSON schema, a regular expression, one of a list of
    # strings, or a grammar in llguidance's Lark dialect
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    _grammar: str | None = PrivateAttr(None)  # set by check_supported

    def sampling_logprobs(self) -> int | None:
        """`SamplingParams.logprobs`: None (off) or how many alternatives each token reports."""
        raise NotImplementedError

    def output_grammar(self) -> str | None:
        """`SamplingParams.grammar`: what the output must follow, if anything."""
        return self._grammar

    def token_biases(self, vocab_size: int) -> dict[int, float] | None:
        """`SamplingParams.logit_bias`: token ids checked against the vocabulary, biases against [-100, 100]."""
        if not self.logit_bias:
            return None
        biases = {}
        for key, bias in self.logit_bias.items():
            if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:  # "²".isdigit(), "٣" too
                raise APIError(400, f"logit_bias key {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                               "logit_bias")
            if not -100 <= bias <= 100:
                raise APIError(400, f"logit_bias[{key}] is {bias}; expected a number in [-100, 100]", "logit_bias")
            biases[int(key)] = bias
        return biases

    def constraints(self) -> dict[str, str]:
        """The output constraints the request sets, as {field: grammar}."""
        found = {}
        if self.guided_json is not None:
            schema = self.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError:
                    raise APIError(400, "guided_json is a string but not a JSON schema", "guided_json") from None
            found["guided_json"] = _json_grammar(schema, "guided_json")
        if self.guided_regex is not None:
            found["guided_regex"] = regex_grammar(self.guided_regex)
        if self.guided_choice is not None:
            found["guided_choice"] = choice_grammar(self.guided_choice)
        if self.guided_grammar is not None:
            found["guided_grammar"] = lark_grammar(self.guided_grammar)
        return found

    def check_supported(self) -> None:
        """Refuse what the server cannot honour instead of ignoring it."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        constraints = self.constraints()
        if len(constraints) > 1:
            raise APIError(400, f"{' and '.join(constraints)} each constrain the output; give one of them",
                           next(iter(constraints)))
        for param, grammar in constraints.items():
            try:
                SamplingParams(grammar=grammar)
            except UserError as err:  # a schema, regex or grammar llguidance cannot compile
                raise APIError(400, str(err), param) from None
            self._grammar = grammar


JSON_TYPES = frozenset(("object", "array", "string", "number", "integer", "boolean", "null"))


def schema_problem(schema: Any, where: str = "") -> str | None:
    """What makes `schema` no JSON schema, in its shape (types, properties, items, required, enum); None if
    nothing. The grammar compiler checks the rest where decoding follows the schema."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"{where or 'the schema'} is {type(schema).__name__}, not an object"
    at = f"{where}." if where else ""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if not all(isinstance(k, str) and k in JSON_TYPES for k in kinds):
        return f"{at}type {kind!r} is not one of {', '.join(sorted(JSON_TYPES))}"
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        return f"{at}properties must be an object"
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        return f"{at}required must be a list of property names"
    if "enum" in schema and not isinstance(schema["enum"], list):
        return f"{at}enum must be a list"
    items = schema.get("items")
    parts = [(f"{at}properties.{name}", sub) for name, sub in properties.items()]
    parts += [(f"{at}items", items)] if isinstance(items, dict) else []
    for path, sub in parts:
        problem = schema_problem(sub, path)
        if problem:
            return problem
    return None


class FunctionSpec(_Body):
    """A function the model may call: its name, what it does, and its arguments' JSON schema."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"]
    function: FunctionName


class TextFormat(_Body):
    type: Literal["text"]


class JsonObjectFormat(_Body):
    """`response_format` {"type": "json_object"}: the reply is one JSON object."""

    type: Literal["json_object"]


class JsonSchema(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Body):
    """`response_format` {"type": "json_schema", "json_schema": {"name", "schema"}}: JSON valid under it."""

    type: Literal["json_schema"]
    json_schema: JsonSchema


# `response_format`: its model chosen by "type"
ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


def _template_kwargs(value: Any) -> dict[str, Any] | None:
    """An object of variables for the template only: none that apply_chat_template sets itself."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError('expected an object of chat template variables, e.g. {"open_thinking": true}')
    if len(value) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"at most {MAX_TEMPLATE_KWARGS} template variables are allowed")
    reserved = sorted(RESERVED_TEMPLATE_NAMES.intersection(value))
    if reserved:
        raise ValueError(f"{reserved[0]!r} is set by the server, not by a request; send only the template's "
                         'own variables, e.g. {"open_thinking": true}')
    return value


# vLLM's `chat_template_kwargs`: extra variables for the chat template, e.g. {"open_thinking": true}
TemplateKwargs = Annotated[
    Annotated[dict[str, Any], Field(max_length=MAX_TEMPLATE_KWARGS, json_schema_extra={
        "propertyNames": {"not": {"enum": sorted(RESERVED_TEMPLATE_NAMES)}}})] | None,
    BeforeValidator(_template_kwargs)]


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # vLLM's: extra variables for the chat template, e.g. {"open_thinking": true} or {"enable_thinking": false}
    chat_template_kwargs: TemplateKwargs = None
    # refused, not ignored; left out of the OpenAPI document (no request should send them)
    functions: SkipJsonSchema[Any] = None  # OpenAI's deprecated form of tools
    function_call: SkipJsonSchema[Any] = None
    modalities: SkipJsonSchema[Any] = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        """One message for every wrong form (pydantic's would name a member of the union)."""
        if value is None or value in ("none", "auto", "required"):
            return value
        function = value.get("function") if isinstance(value, dict) else None
        if isinstance(function, dict) and value.get("type") == "function" and isinstance(function.get("name"), str):
            return NamedToolChoice(type="function", function=FunctionName(name=function["name"]))
        raise ValueError('expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')

    def sampling_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        for legacy in ("functions", "function_call"):
            if getattr(self, legacy) is not None:
                raise APIError(400, f"{legacy} (OpenAI's deprecated function calling) is not supported; send tools "
                               "and tool_choice", legacy)
        if self.modalities not in (None, ["text"]):
            raise APIError(400, 'this model answers in text only: modalities may only be ["text"]', "modalities")
        if self.tool_choice is not None and not self.tools:
            raise APIError(400, "tool_choice is only allowed when tools are given", "tool_choice")
        for i, tool in enumerate(self.tools or ()):  # a bad schema is refused whether or not decoding follows it
            problem = schema_problem(tool.function.parameters or {})
            if problem:
                param = f"tools[{i}].function.parameters"
                raise APIError(400, f"{param}: invalid JSON schema for function {tool.function.name!r}: {problem}",
                               param)
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in self.function_names:
            raise APIError(400, f"tool_choice names {self.tool_choice.function.name!r}, which is not among the "
                           "tools", "tool_choice")
        if self.calls_tools and isinstance(self.response_format, (JsonObjectFormat, JsonSchemaFormat)):
            raise APIError(400, "a JSON response_format leaves no room for tool calls; send tools or a JSON "
                           'response_format (or tool_choice "none")', "response_format")
        super().check_supported()  # last: it builds the grammars, which the checks above keep sound

    def conversation(self) -> list[dict]:
        """Messages for the chat template."""
        return [m.for_template() for m in self.messages]

    @property
    def function_names(self) -> frozenset[str]:
        return frozenset(tool.function.name for tool in self.tools or ())

    @property
    def calls_tools(self) -> bool:
        """Whether the model is shown the tools and its reply read for calls (not with tool_choice "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_tools(self) -> list[dict] | None:
        """The `tools` argument of the chat template."""
        return [tool.model_dump(exclude_none=True) for tool in self.tools] if self.calls_tools else None

    def constraints(self) -> dict[str, str]:
        """Besides vLLM's guided_* fields: calls only (tool_choice "required" or a named function: they parse
        and their arguments fit the function's parameter schema), or JSON (`response_format`)."""
        found = super().constraints()
        if self.calls_tools and self.tool_choice not in (None, "auto"):
            named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
            functions = {t.function.name: t.function.parameters for t in self.tools
                         if named is None or t.function.name == named}
            parallel = named is None and self.parallel_tool_calls is not False
            found["tools"] = tool_call_grammar(functions, parallel)
        if isinstance(self.response_format, JsonSchemaFormat):
            found["response_format"] = _json_grammar(self.response_format.json_schema.schema_, "response_format")
        elif isinstance(self.response_format, JsonObjectFormat):
            found["response_format"] = json_grammar(None)
        return found

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _prompts(value: Any) -> list[str | list[int]]:
    """`prompt` as the list of prompts it holds (a text or a token-id list each)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(_is_int(t) for t in value):
            return [value]
        if all(isinstance(p, str) for p in value):
            return value
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
            return value
    raise ValueError("expected a string, a non-empty list of strings, or non-empty list(s) of token ids")


TokenIds = Annotated[list[int], Field(min_length=1)]
PromptInput = str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions; `prompt` is a string, a list of strings, a token-id list, or a list of those."""

    prompt: Annotated[list[str] | list[list[int]], BeforeValidator(_prompts, json_schema_input_type=PromptInput)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Any = None
    best_of: int | None = None

    def sampling_logprobs(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported (only best_of equal to n)", "best_of")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_request(kind: type[_GenerationRequest], body: dict) -> _GenerationRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    try:
        request = kind.model_validate(body)
    except ValidationError as err:
        raise request_error(err.errors()) from None
    request.check_supported()
    return request


# The tags pydantic puts in an error's location after choosing a member of a discriminated union: a list item's
# (a chat turn's role, a Responses input item's type) and a format's (`response_format`, the Responses `text.format`)
ITEM_TAGS = frozenset({"system", "developer", "user", "assistant", "tool",
                       "message", "function_call", "function_call_output", "reasoning"})
FORMAT_TAGS, FORMAT_FIELDS = frozenset({"text", "json_object", "json_schema"}), frozenset({"response_format", "format"})


def request_error(errors: list[dict]) -> APIError:
    """Pydantic's (or FastAPI's) validation errors -> the 400 of the first, naming its field as `param`."""
    first = errors[0]
    loc = list(first["loc"])
    if loc[:1] == ["body"]:  # FastAPI's prefix for a body field
        loc = loc[1:]
    if not loc and first["type"] in ("model_type", "model_attributes_type", "dict_type", "missing"):
        return APIError(400, "the request body must be a JSON object", None, "invalid_json")
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):  # the field the union is discriminated by
        loc.append(first["ctx"]["discriminator"].strip("'"))
    param = _param_name(tuple(loc)) or None
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param)


def _param_name(loc: tuple) -> str:
    """('messages', 0, 'user', 'content') -> 'messages[0].content' (a union's tag left out)."""
    name, previous = "", None
    for part in loc:
        tags = ITEM_TAGS if isinstance(previous, int) else FORMAT_TAGS if previous in FORMAT_FIELDS else ()
        if part not in tags:
            name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
        previous = part
    return name


def base_params(request: _GenerationRequest, defaults: dict, vocab_size: int) -> SamplingParams:
    """The request's sampling parameters over the model's defaults (max_new_tokens set per prompt later)."""
    chosen = {k: v for k, v in defaults.items() if k != "max_new_tokens"}
    chosen.setdefault("temperature", 1.0)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "seed"):
        value = getattr(request, name)
        if value is not None:
            chosen[name] = value
    if request.top_k is not None:
        chosen["top_k"] = max(request.top_k, 0)
    try:
        return SamplingParams(
            **chosen, presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            stop=request.stop, ignore_eos=request.ignore_eos, logprobs=request.sampling_logprobs(),
            grammar=request.output_grammar(), logit_bias=request.token_biases(vocab_size),
            prompt_logprobs=request.sampling_logprobs() if getattr(request, "echo", False) else None,
        )
    except UserError as err:  # a bad generation_config.json default; the request itself was checked
        raise APIError(400, str(err)) from None


def fit_to_context(params: SamplingParams, request: _GenerationRequest, defaults: dict, prompt_tokens: int,
                   max_seq_len: int, choice: int) -> SamplingParams:
    """`params` for one choice of one prompt: max_new_tokens checked against the context, seed + choice."""
    room = max_seq_len - prompt_tokens
    if room < 1:
        raise APIError(
            400, f"the prompt has {prompt_tokens} tokens but this model's context length is {max_seq_len}; "
            f"a prompt may have at most {max_seq_len - 1} tokens", "messages" if hasattr(request, "messages")
            else "prompt", "context_length_exceeded",
        )
    limit = request.token_limit
    if limit is None:
        limit = min(room, defaults.get("max_new_tokens", room))
    elif limit > room:
        field = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        raise APIError(
            400, f"this model's context length is {max_seq_len} tokens; the prompt has {prompt_tokens}, so "
            f"{field} may be at most {room} (got {limit})", field, "context_length_exceeded",
        )
    seed = None if params.seed is None else params.seed + choice
    return replace(params, max_new_tokens=limit, seed=seed)
