"""Pydantic models of every request and response body, for the OpenAPI document at /openapi.json.

They describe; they do not parse. The routes keep parsing bodies by hand (schemas.py) so an error names the
field the way the client wrote it and unknown fields pass; the fuzz test (tests/test_openapi_fuzz.py)
holds the two together: every body these models allow is answered without a 5xx, and every answer
matches the model documented for its status.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .schemas import MAX_CHOICES

Role = Literal["system", "user", "assistant", "tool"]
Finish = Literal["stop", "length", "tool_calls", "abort"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")          # SDKs add fields often; unknown ones pass


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- shared pieces
class Box(_Open):
    label: str | None = None
    x1: float
    y1: float
    x2: float
    y2: float
    points: list[list[float]] | None = None
    image_index: int | None = None


class FunctionSpec(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(_Open):
    name: str
    arguments: str


class ToolCallOut(_Open):
    id: str
    type: Literal["function"]
    function: CalledFunction


class JsonSchemaSpec(_Open):
    name: str | None = None
    schema_: dict = Field(alias="schema", description=(
        "a JSON Schema the answer follows (grammar-constrained). Bounded by --max-schema-bytes (65536), "
        "--max-schema-properties (1000) and --max-schema-depth (32): past one, a 400 naming it; a compile past "
        "--grammar-compile-timeout (10 s) is a 503. Numbers have at most 16 digits before and after the point "
        "and 3 in the exponent unless minimum/maximum say otherwise; only local $refs ('#/$defs/...')."))
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class SamplingFields(_Open):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, le=2 ** 63 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = Field(None, description="vLLM's extra parameter: keep generating past the end "
                                    "token, up to max_tokens (benchmarks use it so every server makes the same lengths)")
    min_tokens: int | None = Field(None, ge=0, description="vLLM's extra parameter: the end token, stop_token_ids "
                                   "and stop strings cannot end the answer before this many tokens (<= max_tokens)")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    vl_high_resolution_images: bool | None = None


# ---------------------------------------------------------------- OpenAI
class ImageURL(_Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL                        # an image, or a PDF (data:application/pdf, *.pdf): its pages
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    pages: str | int | list[int] | None = None  # a PDF's pages, "1-3,5" (1-based)


class VideoURLPart(_Open):
    type: Literal["video_url"]
    video_url: ImageURL


class VideoFramesPart(_Open):
    type: Literal["video"]
    video: list[str] | str


OpenAIPart = Union[TextPart, ImagePart, VideoURLPart, VideoFramesPart]


class ToolCallIn(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class OpenAIMessage(_Open):
    role: Role
    content: str | list[OpenAIPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatCompletionRequest(SamplingFields):
    model: str | None = Field(None, min_length=1)   # "" is a 400; leave it out instead
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    chat_template_kwargs: dict | None = None


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Open):
    content: list[TokenLogprob] | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    boxes: list[Box] = []


class Choice(_Open):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Finish | None = None


class PromptTokensDetails(_Open):
    cached_tokens: int = Field(ge=0)
    image_tokens: int = Field(ge=0)


class Usage(_Open):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class OpenAIErrorBody(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(_Open):
    error: OpenAIErrorBody


# ---------------------------------------------------------------- DashScope
class DSText(_Open):
    text: str


class DSImage(_Open):
    image: str                                 # an image, or a PDF (data:application/pdf, *.pdf): its pages
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    pages: str | int | list[int] | None = None


class DSVideo(_Open):
    video: list[str] | str
    fps: float | None = Field(None, gt=0)


class DSMessage(_Open):
    role: Role
    content: str | list[Union[DSText, DSImage, DSVideo]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class DSInput(_Open):
    messages: list[DSMessage] = Field(min_length=1)


class OcrTaskConfig(_Open):
    result_schema: dict | None = None


class OcrOptions(_Open):
    task: Literal["text_recognition", "key_information_extraction", "table_parsing", "document_parsing",
                  "formula_recognition", "multi_lan", "advanced_recognition"]
    task_config: OcrTaskConfig | None = None


class DSParameters(SamplingFields):
    max_tokens: int | None = Field(None, ge=1)
    result_format: Literal["message", "text"] | None = None
    incremental_output: bool | None = None
    stream: bool | None = None
    ocr_options: OcrOptions | None = None


class DashScopeRequest(_Open):
    model: str | None = Field(None, min_length=1)   # "" is a 400; leave it out instead
    input: DSInput
    parameters: DSParameters | None = None


class DSContentItem(_Open):
    text: str | None = None
    ocr_result: dict | None = None


class DSAssistantMessage(_Open):
    role: Literal["assistant"]
    content: list[DSContentItem]
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None
    boxes: list[Box] | None = None


class DSChoice(_Open):
    finish_reason: Finish | Literal["null"] | None = None
    message: DSAssistantMessage
    index: int | None = None
    logprobs: dict | None = None


class DSOutput(_Open):
    choices: list[DSChoice] | None = None        # result_format "message"
    text: str | None = None                      # result_format "text"
    finish_reason: str | None = None


class DSUsage(_Open):
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    total_tokens: int | None = Field(None, ge=0)
    image_tokens: int | None = Field(None, ge=0)


class DashScopeResponse(_Open):
    output: DSOutput
    usage: DSUsage
    request_id: str


class DashScopeError(_Open):
    code: str
    message: str
    request_id: str


class UploadPolicy(_Open):
    """What GET /api/v1/uploads?action=getPolicy gives the dashscope SDK for one upload of a local file."""
    policy: str
    signature: str
    upload_dir: str
    upload_host: str
    expire_in_seconds: int
    max_file_size_mb: int
    capacity_limit_mb: int
    oss_access_key_id: str
    x_oss_object_acl: str
    x_oss_forbid_overwrite: str


class UploadPolicyResponse(_Open):
    request_id: str
    data: UploadPolicy


class UploadResult(_Open):
    """The stored file: send it as oss://{key} with the header X-DashScope-OssResourceResolve: enable."""
    request_id: str
    key: str
    kind: Literal["image", "video", "pdf"]
    size: int


class Health(_Open):
    status: Literal["ok", "draining", "stalled"]
    model: str | None = None
    uptime_s: float | None = None
    reason: str | None = None                  # status "stalled": how long the engine has not stepped
