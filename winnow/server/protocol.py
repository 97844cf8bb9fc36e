"""OpenAI wire models: what clients send and what Winnow answers (docs/api.md).

Request models check shapes and types strictly (no "1" for 1, no 1.5 for an int, no NaN; 2.0 is
the integer 2, as JSON Schema has it) and declare each field's range, so that /openapi.json shows
the real API. The bounds come from `winnow.limits`, and `SamplingParams` checks them again. A
field left out is None here and is not passed on, so `SamplingParams` holds the only defaults.
Limits that depend on the model served (context length, vocabulary, max n) are checked by the
engine at admission and filled into the schema by `winnow.server.openapi`.
docs/errors-and-limits.md lists them all. Unknown fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from winnow.engine.outputs import FinishReason
from winnow.limits import (
    INT64_MAX,
    INT64_MIN,
    LOGIT_BIAS_LIMIT,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_MESSAGES,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    PENALTY_MAX,
    TEMPERATURE_MAX,
)
from winnow.structured.backend import GrammarError
from winnow.structured.schema_limits import check_schema_shape


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integral = BeforeValidator(_integral)
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), Integral]
Count = Annotated[int, Field(ge=0, le=INT64_MAX), Integral]
Positive = Annotated[int, Field(ge=1, le=INT64_MAX), Integral]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX), Integral]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), Integral]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-PENALTY_MAX, le=PENALTY_MAX)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
# A logit_bias key spells a token id in decimal.
TokenIdKey = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,18})$")]
Bias = Annotated[float, Field(ge=-LOGIT_BIAS_LIMIT, le=LOGIT_BIAS_LIMIT)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _omitted_when_none(**kwargs: Any) -> Any:
    """A field left out of the JSON when it is None (rather than sent as null)."""
    return Field(default=None, exclude_if=lambda value: value is None, **kwargs)


# ---------------------------------------------------------------------------------------------
# Requests


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"]
    function: FunctionCall


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(_Request):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise PydanticCustomError(
                        "content_part_unsupported",
                        "content part type '{kind}' is not supported by this model",
                        {"kind": kind},
                    )
        return value

    @model_validator(mode="after")
    def _role_rules(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("message_invalid", "only assistant messages carry tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("message_invalid", "tool messages need a tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError(
                "message_invalid", "content is required for {role} messages", {"role": self.role}
            )
        return self

    @property
    def text(self) -> str | None:
        """The content as one string; text parts are joined with newlines (as vLLM does)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class FunctionDefinition(_Request):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _valid_json_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                check_schema_shape(value)
            except GrammarError as exc:
                raise PydanticCustomError("json_schema_too_large", str(exc)) from None
            try:
                validator_for(value).check_schema(value)
            except SchemaError as exc:
                raise PydanticCustomError(
                    "json_schema_invalid",
                    "parameters is not a valid JSON Schema: {reason}",
                    {"reason": exc.message},
                ) from None
        return value


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Request):
    """`response_format.json_schema`. The schema itself is checked when it is compiled
    (`winnow.server.response_format`), so every problem with it names response_format."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, validation_alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                "json_schema_missing", "json_schema is required when type is 'json_schema'"
            )
        return self


class StreamOptions(_Request):
    include_usage: bool | None = None


class GenerationFields(_Request):
    """Fields shared by chat and text completions: the model, sampling, stopping, streaming."""

    model: str | None = None
    temperature: Annotated[float | None, Field(ge=0.0, le=TEMPERATURE_MAX)] = None
    top_p: Probability | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX), Integral] | None = None
    min_p: Probability | None = None
    xtc_probability: Probability | None = None
    xtc_threshold: Probability | None = None
    repetition_penalty: Annotated[float | None, Field(gt=0.0)] = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: Annotated[
        dict[TokenIdKey, Bias] | None, Field(max_length=MAX_LOGIT_BIAS_ENTRIES)
    ] = None
    seed: Int64 | list[Int64] | None = None
    n: Positive | None = None
    max_tokens: Positive | None = None
    min_tokens: Count | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: (
        TokenId | Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None
    ) = Field(default=None, validation_alias=AliasChoices("stop_token_ids", "eos_token"))
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    logprobs_mode: Literal["raw", "processed"] | None = None
    time_limit: Annotated[float | None, Field(gt=0.0, description="milliseconds")] = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Accepted and ignored: they have no meaning for a self-hosted server.
    user: Any = None
    project_id: Any = None
    space_id: Any = None
    session_id: Any = None
    repositories: Any = None


class ChatCompletionRequest(GenerationFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Positive | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: Annotated[list[Tool] | None, Field(max_length=MAX_TOOLS)] = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    system_prompt: str | None = None
    # Accepted and ignored.
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    prediction: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    audio: Any = None
    web_search_options: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    verbosity: Any = None

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or ()]
        if len(set(names)) != len(names):
            raise PydanticCustomError("tools_invalid", "function names in tools must be unique")
        return tools


class CompletionRequest(GenerationFields):
    """Legacy text completions: a prompt (text or token ids) or a list of prompts."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    logprobs: TopLogprobs | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Positive | None = None
    response_format: ResponseFormat | None = None


class TokenizeRequest(_Request):
    """Either `prompt` (text) or `messages` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: Annotated[list[ChatMessage] | None, Field(min_length=1, max_length=MAX_MESSAGES)] = (
        None
    )
    tools: Annotated[list[Tool] | None, Field(max_length=MAX_TOOLS)] = None
    chat_template_kwargs: dict[str, Any] | None = None
    system_prompt: str | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


# ---------------------------------------------------------------------------------------------
# Responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


# A chat choice also ends with "tool_calls" when the model called tools.
ChatFinishReason = FinishReason | Literal["tool_calls"]


class CalledFunction(BaseModel):
    name: str
    arguments: str


class CalledTool(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[CalledTool] | None = _omitted_when_none()


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: ChatFinishReason
    stop_reason: str | int | None = _omitted_when_none(
        description="extension: the stop string, the stop token id, or time_limit"
    )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    seed: int | list[int] = Field(description="extension: the seed(s) actually used")


class FunctionDelta(BaseModel):
    """A call's name comes once, in its first delta; later deltas carry argument pieces."""

    name: str | None = _omitted_when_none()
    arguments: str


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = _omitted_when_none()
    type: Literal["function"] | None = _omitted_when_none()
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = _omitted_when_none()
    content: str | None = _omitted_when_none()
    tool_calls: list[ToolCallDelta] | None = _omitted_when_none()


class OpeningDelta(BaseModel):
    """A choice's first delta: content "" before text, null when the reply opens with a call."""

    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta | OpeningDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None
    stop_reason: str | int | None = _omitted_when_none()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = _omitted_when_none()
    seed: int | list[int]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: str | int | None = _omitted_when_none()


class Completion(BaseModel):
    """A text completion, or one chunk of a streamed one (same object, as OpenAI sends it)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = _omitted_when_none()
    seed: int | list[int]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int = Field(description="extension: the context length served")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
