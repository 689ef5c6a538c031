"""OpenAI-compatible request schemas and response bodies (completions, chat completions, errors).

Validation errors become HTTP 400 with an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`
naming the field. A chat is rendered with the model's stored chat template (`dataprep.finetune.chat`: one
`<|role|>\\ncontent<|endoftext|>` block per message and a final `<|assistant|>\\n`); generation stops at
end-of-text (or a `\\n<|` role marker, which a base model may write).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dataprep.finetune.chat import CHAT_TEMPLATE
from dataprep.finetune.chat import render_chat as render_template
from dataprep.tokenize.tokenizer import EOT_TOKEN
from serving.sampling import RequestError, SamplingParams
from serving.structured import regex_for

CHAT_STOP = "\n<|"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored, as vLLM does


class CompletionRequest(OpenAIModel):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = Field(None, description="{'type': 'json_object'} or {'type': "
                                                   "'json_schema', 'json_schema': {'name', 'schema'}}")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    # extension: beam search (as vLLM's `use_beam_search` / `best_of`)
    use_beam_search: bool = False
    best_of: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool = True


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatCompletionRequest(OpenAIModel):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = Field(None, description="{'type': 'json_object'} or {'type': "
                                                   "'json_schema', 'json_schema': {'name', 'schema'}}")
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, description="{'include_usage': true}: a usage chunk")
    retrieval: dict[str, Any] | None = Field(None, description="{'k': 5, 'mode': 'hybrid'}: answer the last user "
                                             "message from retrieved sources (a server started with a rag index)")


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call")


def reject_unsupported(request: OpenAIModel) -> None:
    """OpenAI fields this server cannot honour answer 400 naming them, rather than being silently ignored."""
    for name in UNSUPPORTED:
        if (request.model_extra or {}).get(name):
            raise RequestError(name, f"{name} is not supported by this server")


def logit_bias(value: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias` ({"token id": bias}) as (id, bias) pairs."""
    pairs = []
    for key, bias in (value or {}).items():
        if not key.lstrip("-").isdigit():
            raise RequestError("logit_bias", f"keys are token ids, got {key!r}")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def penalties(request: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    reject_unsupported(request)
    return {"presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty,
            "logit_bias": logit_bias(request.logit_bias), "regex": regex_for(request.response_format)}


def stops(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def completion_params(request: CompletionRequest, index: int, adapter: str | None = None) -> SamplingParams:
    """Sampling parameters of choice `index` (seeds differ per choice so n > 1 gives different samples)."""
    beam = request.best_of if request.use_beam_search and request.best_of else (
        max(4, request.n) if request.use_beam_search else 1)
    return SamplingParams(
        max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        seed=None if request.seed is None else request.seed + index, stop=stops(request.stop),
        stop_token_ids=tuple(request.stop_token_ids or ()), logprobs=request.logprobs, echo=request.echo,
        beam_width=beam, n_best=request.n if request.use_beam_search else 1, length_penalty=request.length_penalty,
        early_stopping=request.early_stopping,
        ignore_eos=request.ignore_eos, adapter=adapter, **penalties(request))


def chat_params(request: ChatCompletionRequest, index: int, context: int, prompt_tokens: int,
                adapter: str | None = None) -> SamplingParams:
    if request.top_logprobs is not None:
        if not request.logprobs:
            raise RequestError("top_logprobs", "top_logprobs needs logprobs: true")
        if not 0 <= request.top_logprobs <= 20:
            raise RequestError("top_logprobs", f"top_logprobs must be in [0, 20], got {request.top_logprobs}")
    limit = request.max_completion_tokens or request.max_tokens or max(1, min(256, context - prompt_tokens))
    return SamplingParams(
        max_tokens=limit, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        seed=None if request.seed is None else request.seed + index, stop=(*stops(request.stop), CHAT_STOP),
        logprobs=(request.top_logprobs or 0) if request.logprobs else None, adapter=adapter, **penalties(request))


def render_chat(messages: list[ChatMessage], template: str = CHAT_TEMPLATE, eos_token: str = EOT_TOKEN) -> str:
    """The prompt of a chat under the model's stored chat template (the one `transformers` applies)."""
    return render_template([{"role": m.role, "content": m.content} for m in messages], eos_token, True, template)


def prompts_of(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A completion `prompt` as a list of prompts (each a string or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def completion_logprobs(result: dict[str, Any], decode: Callable[[list[int]], str], base: str = "") -> dict[str, Any]:
    """OpenAI legacy `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset.

    `text_offset[i]` is where token i's text starts in the returned text (`base`, the echoed prompt or nothing,
    then the completion), counted on the decoded text: a token holding only part of a UTF-8 character (shown as
    `bytes:\\xNN`) adds no characters until the token that completes the character."""
    prompt_entries, output_entries = result.get("prompt_logprobs", []), result.get("logprobs", [])
    tokens, values, tops, offsets = [], [], [], []
    for part, start in ((prompt_entries, 0), (output_entries, len(base))):
        ids = [entry["token_id"] for entry in part]
        for index, entry in enumerate(part):
            tokens.append(entry["token"])
            values.append(entry["logprob"])
            tops.append({t: lp for _, t, lp in entry["top"]} if entry.get("top") is not None else None)
            offsets.append(start + len(decode(ids[:index]).rstrip("\ufffd")))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


RESPONSE_KINDS = {"completion": ("cmpl", "text_completion"), "chat": ("chatcmpl", "chat.completion")}


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI `usage`; `prompt_tokens_details.cached_tokens`: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response_body(kind: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
                  completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """A non-streaming completion (`kind` "completion") or chat completion ("chat") body with usage."""
    prefix, name = RESPONSE_KINDS[kind]
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": name, "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_body(prompt_tokens, completion_tokens, cached_tokens)}
