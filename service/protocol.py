"""Wire types (msgspec Structs) of the OpenAI API (https://platform.openai.com/docs/api-reference)
and LMDeploy's ``/v1/chat/interactive``; chat and text completions share their sampling fields
through one base. Fields marked "extension" are not in OpenAI's spec. This module never
imports jax.

Each request type's ``to_sampling_params`` is the one place it becomes engine settings.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, ClassVar, Union

import msgspec

from service.errors import InvalidRequest
from service.params import SamplingParams, from_request


class _Req(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A request body: a field this server does not know is refused (400 naming it), never
    silently dropped."""


class _Resp(msgspec.Struct, kw_only=True):
    pass


# -- requests ----------------------------------------------------------------------------------


class ImageURL(_Req):
    url: str
    detail: str | None = None  # OpenAI's resolution hint: a no-op (the model's processor fixes the size)


class ContentPart(_Req):
    type: str  # "text" or "image_url"
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(_Req):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"  # OpenAI sends a JSON object's text


class ToolCallIn(_Req):
    """An assistant message's earlier tool call, in the history."""

    function: FunctionCall
    id: str | None = None
    type: str = "function"


class ChatMessage(_Req):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # assistant (extension); templates decide whether to show it


class FunctionDef(_Req):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments are always enforced by a grammar when constrained


class Tool(_Req):
    type: str
    function: FunctionDef


class FunctionName(_Req):
    name: str


class NamedToolChoice(_Req):
    type: str
    function: FunctionName


class JsonSchemaFormat(_Req):
    name: str = "response"
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None  # the schema is always enforced (a grammar), strict or not


class ResponseFormat(_Req):
    """``text``, ``json_object``, ``json_schema`` (OpenAI); ``regex_schema`` (LMDeploy);
    ``grammar`` (extension: a Lark grammar in llguidance's dialect)."""

    type: str
    json_schema: JsonSchemaFormat | None = None
    regex_schema: str | None = None
    grammar: str | None = None


class StreamOptions(_Req):
    include_usage: bool = False


class _Generation(_Req):
    """The fields chat and text completions share: sampling, stops and streaming."""

    model: str | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int = 1
    presence_penalty: float | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    response_format: ResponseFormat | None = None
    # Accepted and documented as no-ops: OpenAI's end-user id and metadata for its dashboards,
    # its cache routing key (our prefix cache needs none), its latency tier.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    speculative: bool = True  # False: no speculative decoding for this request (same output, less work)
    # Token-level I/O for training loops (vLLM's names): the prompt's and each choice's token ids
    # in the response; the response's id (``/abort_request`` takes it), else a random one.
    return_token_ids: bool = False
    request_id: str | None = None

    def check_fields(self) -> None:
        """Refuse (400, naming the field) what is accepted by the schema but not served."""
        for name in self.__struct_fields__:
            if name in _REFUSED and getattr(self, name) not in (None, False):
                raise InvalidRequest(f"{name} is not supported{_REFUSED[name]}", param=name)
        if self.service_tier not in (None, "auto", "default"):
            raise InvalidRequest(f"service_tier {self.service_tier!r} is not served (auto or default)",
                                 param="service_tier")

    def grammar(self) -> str | None:
        """The llguidance grammar of ``response_format`` (None: free text)."""
        return response_grammar(self.response_format)


# Fields of OpenAI's bodies that this server refuses rather than ignore, with why.
_REFUSED = {
    "audio": " (text output only)",
    "web_search_options": " (no web search)",
    "functions": "; send tools instead",
    "function_call": "; send tool_choice instead",
    "reasoning_effort": " (the reasoning length is the model's own)",
    "verbosity": "",
    "store": " (nothing is stored)",
    "best_of": " with a value other than n",
}


class PredictionPart(_Req):
    type: str
    text: str


class Prediction(_Req):
    """OpenAI's Predicted Outputs: content the answer will largely repeat (an edited file)."""

    type: str
    content: Union[str, list[PredictionPart]]

    def text(self) -> str:
        if self.type != "content":
            raise InvalidRequest(f"prediction type {self.type!r} is not served (content)", param="prediction")
        if isinstance(self.content, str):
            return self.content
        if any(part.type != "text" for part in self.content):
            raise InvalidRequest("prediction content parts must be text", param="prediction")
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Generation, kw_only=True):
    messages: list[ChatMessage]
    # Extension: the prompt as token ids, the chat template already applied (messages then empty).
    prompt_token_ids: list[int] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[str, NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    modalities: list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extension: extra template variables
    # Predicted Outputs: text the answer is expected to repeat, checked as speculative drafts
    prediction: Prediction | None = None
    # Refused when set (see _REFUSED)
    audio: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    store: bool | None = None

    def check_fields(self) -> None:
        super().check_fields()
        if self.modalities is not None and self.modalities != ["text"]:
            raise InvalidRequest("modalities: only [\"text\"] is served", param="modalities")

    def to_sampling_params(self, defaults: SamplingParams | None = None) -> SamplingParams:
        self.check_fields()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs=true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return from_request(self, defaults, max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_Generation, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]; msgspec allows one array type in a union,
    # so the element kinds are checked when the prompt is tokenized.
    prompt: Union[str, list[Union[str, int, list[int]]]]
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    best_of: int | None = None

    def to_sampling_params(self, defaults: SamplingParams | None = None) -> SamplingParams:
        if self.best_of == self.n:
            self.best_of = None  # best of n among n: every sample is returned, as without it
        self.check_fields()
        # echo with logprobs scores the prompt too (how evaluation harnesses ask for a text's
        # likelihood); then max_tokens may be 0: the prompt alone is the answer.
        scored = self.logprobs if self.echo else None
        max_tokens = self.max_tokens
        if max_tokens == 0:
            if not self.echo:
                raise InvalidRequest("max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
            if scored is None:  # the echoed prompt is the whole answer: nothing runs
                max_tokens = None
        return from_request(self, defaults, max_tokens, self.logprobs, prompt_logprobs=scored)


class InteractiveRequest(_Req):
    """LMDeploy's /v1/chat/interactive."""

    prompt: Union[str, list[ChatMessage]]
    session_id: int = -1
    interactive_mode: bool = False
    stream: bool = False
    stop: Union[str, list[str], None] = None
    request_output_len: int | None = None
    # Left out, these take the server's sampling defaults (--generation-config) where it sets
    # them, else ROUTE_DEFAULTS (LMDeploy's), else OpenAI's.
    top_p: float | None = None
    top_k: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    cancel: bool = False
    seed: int | None = None
    adapter_name: str | None = None
    min_new_tokens: int | None = None

    ROUTE_DEFAULTS: ClassVar[dict[str, float]] = {"top_p": 0.8, "top_k": 40, "temperature": 0.8}

    def to_sampling_params(self, defaults: SamplingParams | None = None,
                           configured: frozenset[str] = frozenset()) -> SamplingParams:
        """``configured``: the fields of ``defaults`` the server's configuration set."""
        base = dataclasses.replace(defaults or SamplingParams(),
                                   **{k: v for k, v in self.ROUTE_DEFAULTS.items() if k not in configured})
        return from_request(self, base, self.request_output_len, None)


class TokenizeRequest(_Req):
    prompt: Union[str, None] = None
    messages: list[ChatMessage] | None = None
    model: str | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Req):
    tokens: list[int]
    model: str | None = None


class LoadLoraRequest(_Req):
    """POST /v1/load_lora_adapter (vLLM's shape); ``load_inplace`` is refused."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraRequest(_Req):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; adapters here are named, so it is not read


class LoraResponse(_Resp):
    object: str = "lora_adapter"
    lora_name: str = ""
    status: str = ""  # "loaded" | "unloaded"


class EncodeRequest(_Req):
    """LMDeploy's /v1/encode."""

    input: Union[str, list[str]]
    do_preprocess: bool = False
    add_bos: bool = True


# -- responses ---------------------------------------------------------------------------------


class ModelCard(_Resp):
    id: str
    object: str = "model"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    owned_by: str = "xlaserve"
    root: str | None = None
    parent: str | None = None  # an adapter's base model
    max_model_len: int | None = None  # extension
    weight_version: str | msgspec.UnsetType = msgspec.UNSET  # extension: the base model's weights now


class ModelList(_Resp):
    object: str = "list"
    data: list[ModelCard] = msgspec.field(default_factory=list)


class PromptTokensDetails(_Resp):
    cached_tokens: int = 0


class CompletionTokensDetails(_Resp):
    # Predicted Outputs: prediction tokens checked as drafts and kept, and checked and not kept.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(_Resp):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    # Present only when the request sent a prediction.
    completion_tokens_details: CompletionTokensDetails | msgspec.UnsetType = msgspec.UNSET


class TopLogprob(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChoiceLogprobs(_Resp):
    content: list[TokenLogprobOut] | None = None


class FunctionCallOut(_Resp):
    name: str
    arguments: str


class ToolCallOut(_Resp):
    id: str
    function: FunctionCallOut
    type: str = "function"


class ResponseMessage(_Resp, omit_defaults=True):
    # role and content are always sent (content null with tool calls); the rest when present
    role: str
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Resp):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    # Extensions, present when asked (return_token_ids) or known (the weights that made it).
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET
    weight_version: str | msgspec.UnsetType = msgspec.UNSET


class ChatCompletionResponse(_Resp):
    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # return_token_ids


class FunctionDelta(_Resp, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Resp, omit_defaults=True):
    """A streamed tool call: the first delta of a call has its index, id, type and name, the
    later ones pieces of its arguments."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class DeltaMessage(_Resp, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Resp):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # this chunk's (return_token_ids)
    weight_version: str | msgspec.UnsetType = msgspec.UNSET  # on the chunk that finishes the choice


class ChatCompletionChunk(_Resp):
    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET  # on the first chunk (return_token_ids)


class CompletionLogprobs(_Resp):
    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)


class CompletionChoice(_Resp):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # return_token_ids: its prompt's ids (with its first text) and its tokens' (each chunk's own)
    prompt_token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET
    token_ids: list[int] | msgspec.UnsetType = msgspec.UNSET
    weight_version: str | msgspec.UnsetType = msgspec.UNSET  # once it finishes


class CompletionResponse(_Resp):
    id: str
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None


class InteractiveResponse(_Resp):
    text: str
    tokens: int
    input_tokens: int
    history_tokens: int
    finish_reason: str | None = None


class TokenizeResponse(_Resp):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Resp):
    prompt: str


class EncodeResponse(_Resp):
    input_ids: list[Any]  # list[int] for one input, list[list[int]] for several
    length: Union[int, list[int]]


class ErrorDetail(_Resp):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Resp):
    error: ErrorDetail


# -- request -> engine settings ----------------------------------------------------------------


def format_lark(rf: ResponseFormat | None) -> str | None:
    """``response_format`` as a Lark expression, for an answer that may also be a tool call
    (None: free text). JSON formats only: a regex or a grammar of the caller's own cannot be
    one alternative of the answer's grammar."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        schema: dict[str, Any] = {"type": "object"}
    elif rf.type == "json_schema" and rf.json_schema is not None and isinstance(rf.json_schema.schema, dict):
        schema = rf.json_schema.schema
    elif rf.type == "json_schema":
        raise InvalidRequest("response_format json_schema needs json_schema.schema", param="response_format")
    else:
        raise InvalidRequest(f"response_format type {rf.type!r} cannot be combined with tools (tool_choice auto): "
                             "use json_schema or json_object", param="response_format")
    # Compact JSON, as on its own (see structured.JSON_OPTIONS).
    return "%json " + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})


def response_grammar(rf: ResponseFormat | None) -> str | None:
    """``response_format`` as an llguidance grammar (None for free text)."""
    from service import structured

    if rf is None or rf.type == "text":
        return None
    try:
        if rf.type == "json_object":
            return structured.json_object_grammar()
        if rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema is None:
                raise InvalidRequest("response_format json_schema needs json_schema.schema",
                                     param="response_format")
            return structured.json_schema_grammar(rf.json_schema.schema)
        if rf.type == "regex_schema":
            if not rf.regex_schema:
                raise InvalidRequest("response_format regex_schema needs regex_schema", param="response_format")
            return structured.regex_grammar(rf.regex_schema)
        if rf.type == "grammar":
            if not rf.grammar:
                raise InvalidRequest("response_format grammar needs grammar (Lark)", param="response_format")
            return structured.lark_grammar(rf.grammar)
    except structured.GrammarError as e:
        raise InvalidRequest(f"response_format: {e}", param="response_format") from None
    raise InvalidRequest(f"response_format type {rf.type!r} is not supported (text, json_object, json_schema, "
                         "regex_schema, grammar)", param="response_format")
