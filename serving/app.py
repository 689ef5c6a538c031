"""The Ray Serve application: an OpenAI-compatible HTTP ingress over the engine.

`EngineServer` holds one `serving.engine.Engine`, in a process of its own (`serving.engine_process`: the
scheduler batches concurrent requests there, without sharing an interpreter lock with request handling).
`OpenAIIngress` is a class-based `@serve.ingress` deployment: it validates requests, tokenizes with the engine's
tokenizer itself and calls the engine. By default (`colocate`) each ingress replica runs its own `EngineServer`
(one deployment: a request crosses no Ray call between HTTP and the batch, as vLLM's API server feeds its engine
core directly); with `colocate: false` the engine is a deployment of its own, called through the deployment
handle the ingress was constructed with (streaming through a streaming handle), and a generation whose engine
replica died is rerun on another one. Both layouts go through the same `engine.method.remote(...)` calls
(`LocalEngine`). Its FastAPI app is built per replica from its own state (`__serve_build_asgi_app__`), so the
API key, the metrics and the handle are the instance's, not module globals. `app_builder(ServeArgs)` is the
entry point for `serve run` / `serve deploy` (`infra/serve.yaml`) and `forgeline serve`; Serve validates the
typed arguments before anything starts.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming ending
with `data: [DONE]`), POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /metrics (Prometheus),
GET /engine_stats (one engine replica's counters: steps, seconds busy, tokens, running/waiting sequences).
Errors are OpenAI-style bodies: 400 naming the field, 401 without the API key (when one is set), 408 past
the request timeout, 429 with Retry-After past `max_pending_requests` held generations (backpressure: the
client backs off instead of latency growing without bound), 500 for an internal error (the replica keeps
serving). `/metrics` carries vLLM-style latency histograms (`serving.metrics`); completions and chat take
`response_format` (structured output, `serving.structured`) and report prefix-cache hits as
`usage.prompt_tokens_details.cached_tokens` (`serving.prefix_cache`). A call that Serve cancels (the client
disconnected or timed out) aborts its engine request, freeing the batch row.
"""

import asyncio
import dataclasses
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer

from dataprep.errors import FieldError
from dataprep.rag.embedding import DEFAULT_MODEL
from dataprep.rag.prompt import PromptBudgetError, PromptPlan, RetrievedChunk, build_prompt
from dataprep.rag.retriever import HybridConfig
from serving.engine_process import EngineProcess, allocator_library
from serving.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from serving.openai_api import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    chat_params,
    completion_logprobs,
    completion_params,
    error_body,
    prompts_of,
    render_chat,
    response_body,
    stops,
    usage_body,
)
from serving.rag import RagCompletionRequest, RetrievalOptions, RetrieveRequest, RetrieverServer
from serving.sampling import RequestError, SamplingParams

API_KEY_ENV = "FORGELINE_API_KEY"
Prompt = str | list[int]
Job = tuple[Prompt, SamplingParams]


class ServeArgs(BaseModel):
    """The application's arguments (`infra/serve.yaml` `args:`, `forgeline serve`); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="a pretrain stage, an HF export or a DCP checkpoint")
    name: str = Field("forgeline", min_length=1, description="the model id clients send")
    max_batch: int = Field(64, ge=1, description="sequences decoded together per engine replica (its KV cache "
                           "reserves max_batch x context positions)")
    max_ongoing_requests: int = Field(128, ge=1, description="per engine replica (at least max_batch, so the "
                                      "batch can fill)")
    max_pending_requests: int = Field(256, ge=1, description="generation requests one ingress replica holds at "
                                      "once (running + queued); past it a request answers 429 with Retry-After")
    retry_after_s: int = Field(1, ge=1, description="the Retry-After a 429 suggests")
    max_replicas: int = Field(1, ge=1, description="autoscaling min_replicas..max_replicas on ongoing requests")
    min_replicas: int = Field(1, ge=1, description="engine replicas kept running (2+: a replica's loss is absorbed)")
    engine_retries: int = Field(2, ge=0, description="a generation whose engine replica died is rerun on another "
                                "replica this many times (streams only before their first chunk)")
    colocate: bool = Field(True, description="run the engine inside the HTTP ingress replica (one deployment, "
                           "no ingress-to-engine hop: measured faster, benchmarks/RESULTS.md); false: a separate "
                           "engine deployment, whose lost replicas' generations are rerun (engine_retries)")
    engine_cpus: float = Field(1.0, gt=0)
    engine_threads: int | None = Field(None, ge=1, description="torch threads of an engine replica's large steps; "
                                       "small steps run on one (default: Ray's OMP_NUM_THREADS, its whole CPUs)")
    engine_gpus: float = Field(0.0, ge=0)
    engine_prepack: bool = Field(True, description="keep a oneDNN-blocked copy of each large fp32 weight for steps "
                                 "of 2+ rows (CPU; faster products, twice those weights' memory: "
                                 "workers.decoder.prepack)")
    engine_allocator: str = Field("auto", description="the engine process's memory allocator: auto (TCMalloc where "
                                  "the system has it, e.g. Debian's libtcmalloc-minimal4; measured faster steps), "
                                  "system (the C library's malloc), or the path of an allocator's shared library")
    dtype: Literal["float32", "bfloat16"] = "float32"
    prefix_cache_mb: float = Field(256.0, ge=0, description="memory per engine replica for the KV of shared prompt "
                                   "prefixes (automatic prefix caching); 0 turns it off")
    request_timeout_s: float = Field(60.0, gt=0, description="a request past this answers 408")
    access_log: bool = True
    log_level: str = "INFO"
    api_key: str | None = Field(None, description=f"default: ${API_KEY_ENV}; none = no authentication")
    rag: str | None = Field(None, description="a rag stage directory: /v1/retrieve, /v1/rag/completions and chat "
                            "`retrieval` (none: those answer 400)")
    rag_embedding_model: str | None = Field(None, description="the model the index was built with (default MiniLM)")
    adapters: dict[str, str] = Field(default_factory=dict, description="LoRA adapters (PEFT directories) served "
                                     "beside the base model, by the model name clients send; a batch mixes them")
    rag_max_k: int = Field(20, ge=1, description="the most chunks one request may ask for")
    rag_hybrid: HybridConfig = Field(HybridConfig(), description="how `hybrid` retrieval fuses dense and BM25")
    retriever_replicas: int = Field(1, ge=1)
    retriever_threads: int = Field(2, ge=1, description="torch threads of each retriever replica's query "
                                   "embedding (it runs while the request's engine step waits for it)")


    @model_validator(mode="after")
    def _adapter_names(self) -> "ServeArgs":
        if self.name in self.adapters:
            raise ValueError(f"adapters: {self.name!r} is the base model's name; give the adapter another")
        return self

    @field_validator("engine_allocator")
    @classmethod
    def _allocator_setting(cls, setting: str) -> str:
        if setting not in ("auto", "system") and not Path(setting).is_absolute():
            raise ValueError(f"engine_allocator: {setting!r} is not 'auto', 'system' or an absolute path of a shared "
                             "library (checked on the replica's node)")
        return setting


class QueueFull(Exception):
    """More generation requests pending than `ServeArgs.max_pending_requests` (HTTP 429)."""


def engine_payload(params: SamplingParams) -> dict[str, Any]:
    """Sampling parameters as the plain mapping an engine replica rebuilds them from (`extra` stays here)."""
    return {k: v for k, v in params.__dict__.items() if k != "extra"}


def _settle(future: "asyncio.Future[Any]", kind: str, payload: Any) -> None:
    """Resolve a request's future on the event loop (once: a late event after an abort is ignored)."""
    if future.done():
        return
    if kind == "done":
        future.set_result(payload)
    else:
        future.set_exception(payload)


class EngineServer:
    """One engine, in a process of its own (`serving.engine_process`) fed by this replica."""

    def __init__(self, model: str, name: str = "forgeline", max_batch: int = 64, dtype: str = "float32",
                 prefix_cache_mb: float = 0.0, threads: int | None = None, adapters: dict[str, str] | None = None,
                 prepack: bool = True, allocator: str = "auto") -> None:
        self.core = EngineProcess({"model": model, "name": name, "max_batch": max_batch, "dtype": dtype,
                                   "prefix_cache_mb": prefix_cache_mb, "adapters": adapters or {},
                                   "threads": threads, "prepack": prepack}, preload=allocator_library(allocator))

    async def info(self) -> dict[str, Any]:
        info: dict[str, Any] = await self.core.call("info")
        return info

    async def stats(self) -> dict[str, Any]:
        """Counters since the replica started: requests, prompt/generated tokens, steps, seconds busy in steps."""
        stats: dict[str, Any] = await self.core.call("stats")
        return stats

    async def generate(self, prompt: Prompt, params: dict[str, Any]) -> dict[str, Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        request = self.core.submit(prompt, params, lambda kind, payload: _settle(future, kind, payload)
                                   if kind in ("done", "error") else None)
        try:
            result: dict[str, Any] = await future
            return result
        finally:  # cancelled by Serve (the caller disconnected or timed out) before the end: free the row
            self.core.abort(request)

    async def stream(self, prompt: Prompt, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        request = self.core.submit(prompt, params, lambda kind, payload: events.put_nowait((kind, payload)), True)
        try:
            while True:
                kind, payload = await events.get()
                if kind == "delta":
                    yield {"delta": payload}
                elif kind == "error":
                    raise payload
                else:
                    yield {"done": payload}
                    return
        finally:  # the stream was closed or cancelled before the end (client disconnect): free the row
            self.core.abort(request)

    def check_health(self) -> None:
        if not self.core.alive():
            raise RuntimeError("the engine process is not running")

    def __del__(self) -> None:
        if hasattr(self, "core"):
            self.core.close()


def api_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
              ) -> JSONResponse:
    return JSONResponse(error_body(message, param, kind), status_code=status)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@dataclass(frozen=True)
class StreamFormat:
    """How one kind of endpoint renders its server-sent events (the rest of streaming is shared)."""

    prefix: str
    object_name: str
    chunk: Callable[[int, dict[str, Any], bool], dict[str, Any]]  # (choice index, event, first of its choice)
    usage: bool


def completion_chunk(index: int, event: dict[str, Any], first: bool) -> dict[str, Any]:
    finish = event["done"]["finish_reason"] if "done" in event else None
    return {"index": index, "text": event.get("delta", ""), "logprobs": None, "finish_reason": finish}


def chat_chunk(index: int, event: dict[str, Any], first: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if event.get("delta"):
        delta["content"] = event["delta"]
    return {"index": index, "delta": delta, "finish_reason": event["done"]["finish_reason"] if "done" in event
            else None}


class _LocalMethod:
    """`engine.method.remote(...)` for an engine in this process: the method's coroutine or async generator
    (`EngineServer`'s methods the ingress calls are all async), as awaiting or iterating a handle's response gives."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method = method

    def remote(self, *args: Any) -> Any:
        return self.method(*args)


class LocalEngine:
    """A colocated replica's own `EngineServer` behind the interface of the engine deployment's handle, so the
    ingress code is one for both layouts."""

    def __init__(self, server: EngineServer) -> None:
        self.server = server

    def options(self, **_: Any) -> "LocalEngine":
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.server, name))


class Guarded:
    """ASGI middleware that runs every request through `guard(scope, receive, send, app)`."""

    def __init__(self, app: ASGIApp, guard: Callable[..., Awaitable[None]]) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.guard(scope, receive, send, self.app)


@serve.ingress()
class OpenAIIngress:
    """The HTTP API over the engine deployment: OpenAI-compatible routes, auth, metrics."""

    def __init__(self, engine: Any, args: ServeArgs, retriever: Any = None) -> None:
        """`engine`: the engine deployment's handle, or (colocated) the `EngineServer` arguments to run one here."""
        if isinstance(engine, dict):
            engine = LocalEngine(EngineServer(**engine))
        self.engine, self.args, self.retriever = engine, args, retriever
        self.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        self.telemetry = ServerMetrics()
        self.pending = 0  # generation requests held now (admission control: `admit`)
        self._info: dict[str, Any] = {}

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="forgeline", description="OpenAI-compatible completions over a forgeline model")
        app.add_middleware(Guarded, guard=self.guard)
        app.add_exception_handler(RequestValidationError, self.invalid)  # type: ignore[arg-type]
        app.add_exception_handler(StarletteHTTPException, self.http_error)  # type: ignore[arg-type]
        routes: list[tuple[str, str, Callable[..., Awaitable[Any]]]] = [
            ("GET", "/health", self.health), ("GET", "/v1/models", self.models),
            ("GET", "/tokenizer_info", self.tokenizer_info), ("POST", "/tokenize", self.tokenize),
            ("POST", "/detokenize", self.detokenize), ("GET", "/engine_stats", self.engine_stats),
            ("GET", "/metrics", self.metrics), ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/chat/completions", self.chat), ("POST", "/v1/retrieve", self.retrieve),
            ("POST", "/v1/rag/completions", self.rag_completions)]
        for method, path, endpoint in routes:
            app.add_api_route(path, endpoint, methods=[method])
        return app

    # ---- plumbing shared by every route
    async def guard(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """API key on /v1/ and tokenizer routes (compared in constant time); request count and latency (to the
        response's end). Plain ASGI: Starlette's `BaseHTTPMiddleware` passes every response through a memory
        stream, a measurable cost per request."""
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started, path, status = time.time(), scope["path"], 500
        protected = "/v1/" in path or path.endswith(("/tokenize", "/detokenize"))
        if self.api_key and protected:
            offered = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(offered, f"Bearer {self.api_key}".encode()):
                app = api_error(401, "missing or invalid API key (Authorization: Bearer ...)", None,
                                "authentication_error")  # a response answers the request it is given

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_noting_status)
        finally:
            self.telemetry.requests.labels(path, str(status)).inc()
            self.telemetry.latency.labels(path).observe(time.time() - started)

    async def http_error(self, _: Request, error: StarletteHTTPException) -> JSONResponse:
        """404, 405, ...: OpenAI-style bodies too."""
        return api_error(error.status_code, str(error.detail), None, "invalid_request_error")

    async def invalid(self, _: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return api_error(400, f"invalid JSON: {first.get('msg')}", "body")
        param = ".".join(location) or None
        return api_error(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param)

    async def info(self) -> dict[str, Any]:
        """The engine's model facts and tokenizer, fetched once per ingress replica."""
        if not self._info:
            details = await self.engine.info.remote()
            self._info.update(details, tokenizer=Tokenizer.from_str(details["tokenizer_json"]))
        return self._info

    async def encode(self, text: str) -> list[int]:
        """Tokenized here, with the engine's own tokenizer: no round trip to the busy engine replica."""
        ids: list[int] = (await self.info())["tokenizer"].encode(text, add_special_tokens=False).ids
        return ids

    async def decode(self, ids: list[int]) -> str:
        text: str = (await self.info())["tokenizer"].decode(ids, skip_special_tokens=False)
        return text

    def unknown_model(self, name: str) -> JSONResponse | None:
        """404 `model_not_found` (as OpenAI and vLLM answer) for a name that is neither the base nor an adapter."""
        if name != self.args.name and name not in self.args.adapters:
            served = ", ".join(repr(n) for n in [self.args.name, *sorted(self.args.adapters)])
            response = api_error(404, f"model {name!r} does not exist; this server serves {served}", "model")
            body = json.loads(bytes(response.body))
            body["error"]["code"] = "model_not_found"
            return JSONResponse(body, status_code=404)
        return None

    def adapter_of(self, name: str) -> str | None:
        """The LoRA adapter a request's `model` selects (None: the base model)."""
        return None if name == self.args.name else name

    async def chat_prompt(self, messages: list[ChatMessage]) -> str:
        """The chat rendered with the model's stored chat template."""
        details = await self.info()
        return render_chat(messages, details["chat_template"], details["eos_token"])

    def failure(self, error: Exception) -> JSONResponse:
        """An OpenAI-style error body: 400 naming the field for a bad request (raised here or in a replica)."""
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, FieldError):
            return api_error(400, str(cause), cause.param)
        if isinstance(cause, PromptBudgetError):
            return api_error(400, str(cause), "question")
        if isinstance(cause, ValidationError):  # a nested object of the request (chat `retrieval`)
            first = cause.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            return api_error(400, f"{param}: {first.get('msg')}", param)
        if isinstance(error, QueueFull):
            response = api_error(429, str(error), None, "rate_limit_error")
            response.headers["Retry-After"] = str(self.args.retry_after_s)
            return response
        if isinstance(error, RayActorError):
            response = api_error(503, f"the engine replica serving this request was lost: {type(error).__name__}",
                                 None, "server_error")
            response.headers["Retry-After"] = str(self.args.retry_after_s)
            return response
        if isinstance(error, asyncio.TimeoutError | TimeoutError):
            return api_error(408, f"request exceeded the {self.args.request_timeout_s:.0f} s timeout", None,
                             "timeout")
        return api_error(500, f"internal error: {type(error).__name__}: {error}", None, "server_error")

    async def validate(self, jobs: list[Job]) -> None:
        """Token ids in the vocabulary; prompt + max_tokens within the context (RequestError names the field)."""
        details = await self.info()
        if not jobs:
            raise RequestError("prompt", "no prompt given")
        for prompt, params in jobs:
            if not prompt:
                raise RequestError("prompt", "a prompt is empty")
            if isinstance(prompt, list):
                if any(not 0 <= t < details["vocab_size"] for t in prompt):
                    raise RequestError("prompt", f"token ids must be in [0, {details['vocab_size']})")
                if prompt:
                    params.validate(len(prompt), details["max_model_len"])

    async def run_jobs(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Every job through the engine concurrently (each bounded by the request timeout)."""
        timeout, started = self.args.request_timeout_s, time.perf_counter()
        try:
            results = await asyncio.gather(*(asyncio.wait_for(self.generate_once(prompt, engine_payload(params)),
                                                              timeout=timeout) for prompt, params in jobs))
        except TimeoutError:
            self.telemetry.aborted.labels("timeout").inc(len(jobs))
            raise
        except asyncio.CancelledError:
            self.telemetry.aborted.labels("client_gone").inc(len(jobs))
            raise
        for result in results:
            self.telemetry.observe(result, time.perf_counter() - started)
        return list(results)

    async def generate_once(self, prompt: Prompt, payload: dict[str, Any]) -> dict[str, Any]:
        """One generation on an engine replica; if that replica dies under it (node lost, process killed), the
        generation is rerun on another replica (`engine_retries` times): nothing was returned yet, and with the
        request's seed the rerun gives the same result."""
        for attempt in range(self.args.engine_retries + 1):
            try:
                result: dict[str, Any] = await self.engine.generate.remote(prompt, payload)
                return result
            except RayActorError:
                if not self.may_rerun(attempt):
                    raise
        raise AssertionError("unreachable")

    def may_rerun(self, attempt: int) -> bool:
        """Whether a generation whose engine replica died on try `attempt` (0-based) is rerun (and counted)."""
        if attempt >= self.args.engine_retries:
            return False
        self.telemetry.retried.inc()
        return True

    async def events(self, jobs: list[Job]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """Events of every job's stream as they come, tagged with the choice index."""
        queue: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()

        async def pump(index: int, prompt: Prompt, params: SamplingParams) -> None:
            payload = engine_payload(params)
            try:
                for attempt in range(self.args.engine_retries + 1):
                    sent = False
                    try:
                        async for event in self.engine.options(stream=True).stream.remote(prompt, payload):
                            sent = True
                            await queue.put((index, event))
                        break
                    except RayActorError:  # its replica died: rerun elsewhere if nothing reached the client yet
                        if sent or not self.may_rerun(attempt):
                            raise
            except Exception as error:  # reaches the client as an error event now, not as a timeout later
                await queue.put((index, {"failed": error}))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, p, params)) for i, (p, params) in enumerate(jobs)]
        open_streams = len(tasks)
        try:
            while open_streams:
                index, event = await asyncio.wait_for(queue.get(), timeout=self.args.request_timeout_s)
                if event is None:
                    open_streams -= 1
                    continue
                if "failed" in event:
                    raise event["failed"]
                yield index, event
        finally:  # the client left or a stream failed: stop the others, so their engine requests are aborted
            for task in tasks:
                task.cancel()

    async def stream(self, jobs: list[Job], form: StreamFormat, echoed: list[str] | None = None
                     ) -> AsyncIterator[str]:
        """Server-sent events for completions and chat alike: a chunk per event, usage, `[DONE]`. With usage
        requested every chunk carries `"usage": null` and a last chunk without choices carries the totals."""
        ident, created, name = f"{form.prefix}-{time.time_ns()}", int(time.time()), jobs[0][1].adapter or self.args.name
        usage, started, finished = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}, set(), 0
        begun = time.perf_counter()
        per_prompt = len(jobs) // len(echoed) if echoed else len(jobs)  # chat: every choice shares one prompt
        head = {"id": ident, "object": form.object_name, "created": created, "model": name}
        if form.usage:
            head["usage"] = None
        try:
            async for index, event in self.events(jobs):
                if "done" in event:
                    finished += 1
                    self.telemetry.observe(event["done"], time.perf_counter() - begun)
                    if index % per_prompt == 0:
                        usage["prompt_tokens"] += event["done"]["prompt_tokens"]
                        usage["cached_tokens"] += event["done"]["cached_tokens"]
                    usage["completion_tokens"] += event["done"]["completion_tokens"]
                if index not in started and echoed and echoed[index // per_prompt]:
                    event = {**event, "delta": echoed[index // per_prompt] + event.get("delta", "")}
                yield sse({**head, "choices": [form.chunk(index, event, index not in started)]})
                started.add(index)
        except Exception as error:
            yield sse(error_body(str(error), getattr(error, "param", None)))
        finally:  # a client that left mid-stream (the generator is closed) or a failure: count what was cut off
            self.release(len(jobs))
            if finished < len(jobs):
                self.telemetry.aborted.labels("stream_closed").inc(len(jobs) - finished)
        if form.usage:
            yield sse({**head, "choices": [], "usage": usage_body(usage["prompt_tokens"], usage["completion_tokens"],
                                                                  usage["cached_tokens"])})
        yield "data: [DONE]\n\n"

    @staticmethod
    def include_usage(options: dict[str, Any] | None) -> bool:
        """`stream_options: {"include_usage": true}`: a last chunk with the usage (as OpenAI, off by default)."""
        if options is not None and not isinstance(options.get("include_usage", False), bool):
            raise RequestError("stream_options.include_usage", "must be true or false")
        return bool((options or {}).get("include_usage"))

    def admit(self, count: int) -> None:
        """Hold `count` more generations, or raise QueueFull past `max_pending_requests` (answered 429 with
        Retry-After: the client backs off instead of latency growing without bound)."""
        if self.pending + count > self.args.max_pending_requests:
            self.telemetry.rejected.labels("queue_full").inc()
            raise QueueFull(f"server busy: {self.pending} requests pending (limit {self.args.max_pending_requests}); "
                            f"retry after {self.args.retry_after_s} s")
        self.pending += count

    def release(self, count: int) -> None:
        self.pending -= count

    async def respond(self, jobs: list[Job], form: StreamFormat, streaming: bool,
                      render: Callable[[list[dict[str, Any]]], Awaitable[dict[str, Any]]],
                      echoed: list[str] | None = None, stream_options: dict[str, Any] | None = None) -> Any:
        """The one path of completions and chat: validate, then stream or run and render the body. `echoed`: per
        prompt, the text a streamed choice starts with (completions' `echo`)."""
        try:
            await self.validate(jobs)
            form = dataclasses.replace(form, usage=self.include_usage(stream_options))
            self.admit(len(jobs))
        except Exception as error:
            return self.failure(error)
        if streaming:  # the stream releases its admission when it ends
            return StreamingResponse(self.stream(jobs, form, echoed), media_type="text/event-stream")
        try:
            return await render(await self.run_jobs(jobs))
        except Exception as error:
            return self.failure(error)
        finally:
            self.release(len(jobs))

    # ---- retrieval
    def no_index(self) -> JSONResponse | None:
        if self.retriever is None:
            return api_error(400, "this server has no rag index: start it with a rag stage (ServeArgs.rag, "
                             "`forgeline serve --rag`)", "model")
        return None

    async def grounded_prompt(self, question: str, options: RetrievalOptions, max_tokens: int,
                              history: list[ChatMessage] | None = None) -> tuple[list[int], PromptPlan]:
        """Retrieve for `question` and fit the sources into the context: prompt + max_tokens <= context, counted
        on the final prompt (wrapped in the chat template after `history` when chatting)."""
        found = await self.retriever.search.remote(question, options.k, options.mode)
        chunks = [RetrievedChunk(c["chunk_id"], c["doc_id"], c["text"], c["score"], c["url"], c["start_char"],
                                 c["end_char"]) for c in found]
        details = await self.info()
        tokenizer = details["tokenizer"]

        def wrap(prompt: str) -> str:
            if history is None:
                return prompt
            return render_chat([*history, ChatMessage(role="user", content=prompt)], details["chat_template"],
                               details["eos_token"])

        def count(prompt: str) -> int:
            return len(tokenizer.encode(wrap(prompt), add_special_tokens=False).ids)

        plan = build_prompt(question, chunks, count, details["max_model_len"], max_tokens, options.instructions)
        return await self.encode(wrap(plan.prompt)), plan

    @staticmethod
    def sources(plan: PromptPlan) -> dict[str, Any]:
        return {"sources": [source.__dict__ for source in plan.used],
                "dropped": [{"chunk_id": chunk, "reason": reason} for chunk, reason in plan.dropped]}

    async def retrieve(self, body: RetrieveRequest) -> Any:
        if (missing := self.no_index()) is not None:
            return missing
        try:
            chunks = await self.retriever.search.remote(body.query, body.k, body.mode)
        except Exception as error:
            return self.failure(error)
        return {"object": "list", "data": chunks}

    async def rag_completions(self, body: RagCompletionRequest) -> Any:
        if (bad := self.unknown_model(body.model) or self.no_index()) is not None:
            return bad
        try:
            options = RetrievalOptions(k=body.k, mode=body.mode, instructions=body.instructions)
            prompt_ids, plan = await self.grounded_prompt(body.question, options, body.max_tokens)
            params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    seed=body.seed, stop=stops(body.stop), ignore_eos=body.ignore_eos,
                                    adapter=self.adapter_of(body.model))
            await self.validate([(prompt_ids, params)])
            self.admit(1)
        except Exception as error:
            return self.failure(error)
        try:
            (result,) = await self.run_jobs([(prompt_ids, params)])
        except Exception as error:
            return self.failure(error)
        finally:
            self.release(1)
        choice = {"index": 0, "text": result["text"], "finish_reason": result["finish_reason"], "logprobs": None}
        body_out = response_body("completion", body.model, [choice], result["prompt_tokens"],
                                 result["completion_tokens"], result["cached_tokens"])
        return {**body_out, **self.sources(plan)}

    def check_health(self) -> None:
        """Serve's replica health check: a colocated engine's scheduler thread must be alive."""
        if isinstance(self.engine, LocalEngine):
            self.engine.server.check_health()

    # ---- routes
    async def health(self) -> dict[str, Any]:
        details = await self.info()
        return {"status": "ok", "dtype": details["dtype"], "torch_threads": details["torch_threads"],
                "preloaded": [Path(path).name for path in details.get("preloaded", [])]}

    async def models(self) -> dict[str, Any]:
        details = await self.info()
        base = {"id": self.args.name, "object": "model", "created": 0, "owned_by": "forgeline",
                "max_model_len": details["max_model_len"], "root": self.args.model, "parent": None}
        adapters = [{**base, "id": name, "root": path, "parent": self.args.name}  # as vLLM lists LoRA modules
                    for name, path in sorted(self.args.adapters.items())]
        return {"object": "list", "data": [base, *adapters]}

    async def tokenizer_info(self) -> dict[str, Any]:
        details = await self.info()
        return {"tokenizer_class": details["tokenizer_class"], "model_max_length": details["max_model_len"],
                "vocab_size": details["vocab_size"], "eos_token": details["eos_token"],
                "bos_token": details["eos_token"], "eos_token_id": details["eos_token_id"]}

    async def tokenize(self, body: dict[str, Any]) -> Any:
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            return api_error(400, "send {'prompt': '<text>'}", "prompt")
        ids = await self.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": (await self.info())["max_model_len"]}

    async def detokenize(self, body: dict[str, Any]) -> Any:
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            return api_error(400, "send {'tokens': [ids]}", "tokens")
        vocab = (await self.info())["vocab_size"]
        if any(not 0 <= t < vocab for t in ids):
            return api_error(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": await self.decode(ids)}

    async def engine_stats(self) -> dict[str, Any]:
        """One engine replica's counters (steps, busy seconds, tokens, running/waiting sequences)."""
        stats: dict[str, Any] = await self.engine.stats.remote()
        return stats

    async def metrics(self) -> PlainTextResponse:
        self.telemetry.sample(await self.engine.stats.remote(), self.pending)
        return PlainTextResponse(self.telemetry.render().decode(), media_type=CONTENT_TYPE_LATEST)

    async def completions(self, body: CompletionRequest) -> Any:
        if (bad := self.unknown_model(body.model)) is not None:
            return bad
        if body.use_beam_search and body.best_of is not None and body.best_of < body.n:
            return api_error(400, f"best_of ({body.best_of}) must be at least n ({body.n})", "best_of")
        if body.use_beam_search and body.stream:
            return api_error(400, "beam search returns whole hypotheses: use stream: false", "stream")
        prompts = prompts_of(body.prompt)
        prompt_ids = [p if isinstance(p, list) else await self.encode(p) for p in prompts]
        # beam search: one search per prompt returns its n best beams; sampling: n independent samples
        per_prompt = 1 if body.use_beam_search else body.n
        try:
            jobs: list[Job] = [(ids, completion_params(body, i, self.adapter_of(body.model))) for ids in prompt_ids
                               for i in range(per_prompt)]
        except RequestError as error:
            return self.failure(error)
        echoed = [(p if isinstance(p, str) else await self.decode(p)) if body.echo else "" for p in prompts]
        decode = (await self.info())["tokenizer"].decode

        async def render(results: list[dict[str, Any]]) -> dict[str, Any]:
            choices: list[dict[str, Any]] = []
            for job, result in enumerate(results):
                base = echoed[job // per_prompt]
                hypotheses = result["extra"].get("beams") or [result]
                for hypothesis in hypotheses:
                    choice: dict[str, Any] = {"index": len(choices), "text": base + hypothesis["text"],
                                              "finish_reason": hypothesis["finish_reason"], "logprobs": None}
                    if body.logprobs is not None:
                        choice["logprobs"] = completion_logprobs(result, decode, base)
                    choices.append(choice)
            prompt_tokens = sum(r["prompt_tokens"] for r in results[::per_prompt])
            return response_body("completion", body.model, choices, prompt_tokens,
                                 sum(len(h["output_ids"]) for r in results for h in r["extra"].get("beams") or [r]),
                                 sum(r["cached_tokens"] for r in results[::per_prompt]))

        form = StreamFormat("cmpl", "text_completion", completion_chunk, False)
        return await self.respond(jobs, form, body.stream, render, echoed, body.stream_options)

    async def chat(self, body: ChatCompletionRequest) -> Any:
        if (bad := self.unknown_model(body.model)) is not None:
            return bad
        details = await self.info()
        grounding: dict[str, Any] = {}
        if body.retrieval is not None:  # answer the last user message from retrieved, numbered sources
            if (missing := self.no_index()) is not None:
                return missing
            *history, last = body.messages
            budget = body.max_completion_tokens or body.max_tokens or 64
            try:
                prompt_ids, plan = await self.grounded_prompt(last.content, RetrievalOptions.model_validate(
                    body.retrieval), budget, history)
            except Exception as error:
                return self.failure(error)
            grounding = self.sources(plan)
        else:
            prompt_ids = await self.encode(await self.chat_prompt(body.messages))
        try:
            jobs: list[Job] = [(prompt_ids, chat_params(body, i, details["max_model_len"], len(prompt_ids),
                                                        self.adapter_of(body.model))) for i in range(body.n)]
        except RequestError as error:
            return self.failure(error)

        async def render(results: list[dict[str, Any]]) -> dict[str, Any]:
            choices = []
            for index, result in enumerate(results):
                choice: dict[str, Any] = {"index": index, "finish_reason": result["finish_reason"], "logprobs": None,
                                          "message": {"role": "assistant", "content": result["text"]}}
                if body.logprobs:
                    choice["logprobs"] = {"content": [
                        {"token": e["token"], "logprob": e["logprob"],
                         "top_logprobs": [{"token": t, "logprob": lp} for _, t, lp in e["top"]]}
                        for e in result["logprobs"]]}
                choices.append(choice)
            return {**response_body("chat", body.model, choices, len(prompt_ids),
                                    sum(r["completion_tokens"] for r in results),
                                    max(r["cached_tokens"] for r in results)), **grounding}

        form = StreamFormat("chatcmpl", "chat.completion.chunk", chat_chunk, False)
        return await self.respond(jobs, form, body.stream, render, None, body.stream_options)


def app_builder(args: ServeArgs) -> Any:
    """`serve run serving.app:app_builder model=PATH` / `infra/serve.yaml`: the ingress bound to the engine.

    Serve validates `args` as `ServeArgs` (the annotation); a plain mapping is validated here too."""
    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(args)
    logging = {"enable_access_log": args.access_log, "log_level": args.log_level}
    engine_args = {"model": str(Path(args.model).resolve()), "name": args.name, "max_batch": args.max_batch,
                   "dtype": args.dtype, "prefix_cache_mb": args.prefix_cache_mb, "threads": args.engine_threads,
                   "prepack": args.engine_prepack, "allocator": args.engine_allocator,
                   "adapters": {name: str(Path(path).resolve()) for name, path in args.adapters.items()}}
    autoscaling = {"min_replicas": args.min_replicas, "target_ongoing_requests": 16,
                   "max_replicas": max(args.min_replicas, args.max_replicas)}
    scaling: dict[str, Any] = {"autoscaling_config": autoscaling,
                               "ray_actor_options": {"num_cpus": args.engine_cpus, "num_gpus": args.engine_gpus}}
    engine: Any = engine_args
    if not args.colocate:
        engine = serve.deployment(EngineServer, name="engine", max_ongoing_requests=args.max_ongoing_requests,
                                  logging_config=logging, health_check_period_s=10, **scaling,
                                  ).bind(**engine_args)  # type: ignore[attr-defined]
    retriever = None
    if args.rag is not None:
        retriever = serve.deployment(
            RetrieverServer, name="retriever", num_replicas=args.retriever_replicas, logging_config=logging,
            ray_actor_options={"num_cpus": 0},
        ).bind(str(Path(args.rag).resolve()), args.rag_embedding_model or DEFAULT_MODEL, None,  # type: ignore[attr-defined]
               args.rag_max_k, args.rag_hybrid, args.retriever_threads)
    # the ingress takes every request up to its own admission limit (and health/metrics beside), so past the
    # limit a client gets 429 rather than waiting in Serve's proxy queue
    # colocated, the ingress replicas are the engine replicas (their CPUs, their autoscaling)
    placement: dict[str, Any] = scaling if args.colocate else {"ray_actor_options": {"num_cpus": 0}}
    ingress = serve.deployment(OpenAIIngress, name="ingress", max_ongoing_requests=args.max_pending_requests + 64,
                               logging_config=logging, health_check_period_s=10, **placement)
    return ingress.bind(engine, args, retriever)  # type: ignore[attr-defined]
