"""The Responses API's wire models (POST /v1/responses): what clients send, what Winnow answers.

Input items are checked here for their shape only; what they mean together (a
`function_call_output` must answer a call of the conversation, roles and part types the model
can read) is checked when they become chat messages (`winnow.server.responses_input`). Output
objects carry every field the OpenAI SDK's strict types require.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from winnow.limits import MAX_INPUT_ITEMS, MAX_TOOLS
from winnow.server.protocol import (
    GenerationFields,
    Integral,
    JsonSchemaFormat,
    Positive,
    TopLogprobs,
    _Request,
)

# `include` values Winnow serves; others are accepted and ignored (they name hosted tools).
LOGPROBS_INCLUDE = "message.output_text.logprobs"


class InputContentPart(_Request):
    """`input_text` (user, system, developer) or `output_text` (an assistant turn sent back);
    other part types (images, files) are refused when the item becomes a message."""

    type: str
    text: str | None = None


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputContentPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[InputContentPart]
    id: str | None = None
    status: str | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem
_ITEM_TYPES: dict[str, type[MessageItem] | type[FunctionCallItem]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
}


def parse_input_item(raw: Any) -> InputItem:
    """One item by its `type` (a message may leave `type` out); an unknown type is refused by
    name rather than with every union member's complaint."""
    if not isinstance(raw, dict):
        raise PydanticCustomError("item_invalid", "an input item must be an object")
    kind = raw.get("type", "message")
    if kind == "function_call_output":
        return FunctionCallOutputItem.model_validate(raw)
    model = _ITEM_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise PydanticCustomError(
            "item_unsupported", "input item type '{kind}' is not supported", {"kind": str(kind)}
        )
    return model.model_validate(raw)


class FunctionTool(_Request):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    """`text.format`: `text`, `json_object`, or `json_schema` with its fields inline."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, validation_alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise PydanticCustomError(
                "format_invalid", "a json_schema format needs a name and a schema"
            )
        return self

    def echoed(self) -> dict[str, Any]:
        """As the response repeats it."""
        fields: dict[str, Any] = {"type": self.type, "name": self.name}
        fields |= {"description": self.description, "schema": self.schema_, "strict": self.strict}
        return {key: value for key, value in fields.items() if value is not None}

    def json_schema(self) -> JsonSchemaFormat:
        assert self.name is not None
        return JsonSchemaFormat.model_construct(
            name=self.name, description=self.description, schema_=self.schema_, strict=self.strict
        )


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: Any = None


class ResponsesRequest(GenerationFields):
    """POST /v1/responses; Winnow's own sampling fields as on chat (`n` must stay 1)."""

    n: Annotated[int, Field(ge=1, le=1), Integral] | None = None  # one output per response
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_INPUT_ITEMS)]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    max_output_tokens: Positive | None = None
    tools: Annotated[list[dict[str, Any]] | None, Field(max_length=MAX_TOOLS)] = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    include: list[str] | None = None
    top_logprobs: TopLogprobs | None = None
    metadata: dict[str, str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Accepted and ignored.
    reasoning: Any = None
    truncation: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    background: Any = None
    max_tool_calls: Any = None


# ---------------------------------------------------------------------------------------------
# Output


class OutputLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class OutputTokenLogprob(OutputLogprob):
    top_logprobs: list[OutputLogprob]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[OutputTokenLogprob] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    call_id: str
    name: str
    arguments: str


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseErrorInfo(BaseModel):
    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"]
    message: str


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseErrorInfo | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    temperature: float | None
    top_p: float | None
    tool_choice: Any
    tools: list[dict[str, Any]]
    text: dict[str, Any]
    truncation: Literal["disabled"] = "disabled"
    store: bool
    metadata: dict[str, str]
    usage: ResponseUsage | None = None


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
