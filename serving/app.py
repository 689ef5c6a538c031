"""The Ray Serve application: an HTTP ingress (FastAPI, OpenAI-compatible) and an engine deployment.

`EngineServer` holds one `serving.engine.Engine` per replica (its scheduler thread batches concurrent requests);
`APIIngress` validates requests and calls it through a deployment handle (streaming through a streaming
handle). `app_builder({"model": PATH, ...})` is the entry point for `serve run`/`serve deploy`
(`infra/serve.yaml`) and `forgeline serve`.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streaming ending
with `data: [DONE]`), POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /metrics (Prometheus),
GET /engine_stats (one engine replica's counters: steps, seconds busy, tokens, running/waiting sequences).
Errors are OpenAI-style bodies: 400 naming the field, 401 without the API key (when one is set), 408 past
the request timeout, 500 for an internal error (the replica keeps serving). A call that Serve cancels (the client
disconnected or timed out) aborts its engine request, freeing the batch row.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve
from tokenizers import Tokenizer

from serving.engine import Engine
from serving.engine import Request as EngineRequest
from serving.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_params,
    completion_logprobs,
    completion_params,
    error_body,
    prompts_of,
    render_chat,
    response_body,
)
from serving.sampling import RequestError, SamplingParams

API_KEY_ENV = "FORGELINE_API_KEY"


_ENGINE_HANDLES: dict[str, Any] = {}


def _settle(future: asyncio.Future[Any], kind: str, payload: Any) -> None:
    """Resolve a request's future on the event loop (once: a late event after an abort is ignored)."""
    if future.done():
        return
    if kind == "done":
        future.set_result(payload)
    else:
        future.set_exception(payload)


def register_engine(name: str, handle: Any) -> None:
    """Called by the ingress replica; module-level (pickled by reference) so the routes find the same dict."""
    _ENGINE_HANDLES[name] = handle


def registered_engine(name: str) -> Any:
    return _ENGINE_HANDLES[name]


def result_dict(engine: Engine, request: EngineRequest) -> dict[str, Any]:
    def entry(item: Any) -> dict[str, Any]:
        return {"token_id": item.token_id, "token": item.token, "logprob": item.logprob, "top": item.top}

    prompt_entries = []
    if request.params.echo:
        for token_id, item in zip(request.prompt_ids, request.prompt_logprobs, strict=False):
            prompt_entries.append(entry(item) if item is not None else
                                  {"token_id": token_id, "token": engine.token_text(token_id), "logprob": None,
                                   "top": None})
    return {"output_ids": request.output_ids, "text": request.text, "finish_reason": request.finish_reason,
            "logprobs": [entry(i) for i in request.logprobs], "prompt_logprobs": prompt_entries,
            "prompt_tokens": len(request.prompt_ids), "completion_tokens": len(request.output_ids),
            "extra": request.extra}


class EngineServer:
    """One engine per replica; its background thread runs the continuous-batching scheduler."""

    def __init__(self, model: str, name: str = "forgeline", max_batch: int = 16, dtype: str = "float32") -> None:
        self.engine = Engine.load(Path(model), name=name, max_batch=max_batch, dtype=dtype)
        self.engine.start()

    def info(self) -> dict[str, Any]:
        tokenizer = self.engine.tokenizer
        return {"name": self.engine.name, "max_model_len": self.engine.config.max_seq_len,
                "vocab_size": tokenizer.get_vocab_size(), "eos_token": tokenizer.id_to_token(self.engine.eot_id),
                "eos_token_id": self.engine.eot_id, "tokenizer_class": "PreTrainedTokenizerFast",
                "tokenizer_json": tokenizer.to_str(), "stats": dict(self.engine.stats),
                "torch_threads": torch.get_num_threads(), "dtype": str(self.engine.dtype).removeprefix("torch.")}

    def stats(self) -> dict[str, Any]:
        """Counters since the replica started: requests, prompt/generated tokens, steps, seconds busy in steps."""
        return {**self.engine.stats, "running": len(self.engine.running), "waiting": self.engine.waiting.qsize()}

    def tokenize(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.engine.decode(ids)

    def _submit(self, prompt: str | list[int], params: dict[str, Any], on_event: Any) -> EngineRequest:
        ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.engine.submit(ids, SamplingParams(**params), on_event)

    async def generate(self, prompt: str | list[int], params: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def on_event(kind: str, payload: Any) -> None:
            if kind in ("done", "error"):
                loop.call_soon_threadsafe(_settle, future, kind, payload)

        request = self._submit(prompt, params, on_event)
        try:
            return result_dict(self.engine, await future)
        finally:  # cancelled by Serve (the caller disconnected or timed out) before the end: free the row
            self.engine.abort(request)

    async def stream(self, prompt: str | list[int], params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        request = self._submit(prompt, params, lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait,
                                                                                                (kind, payload)))
        try:
            while True:
                kind, payload = await events.get()
                if kind == "delta":
                    yield {"delta": payload}
                elif kind == "error":
                    raise payload
                else:
                    yield {"done": result_dict(self.engine, payload)}
                    return
        finally:  # the stream was closed or cancelled before the end (client disconnect): free the row
            self.engine.abort(request)

    def check_health(self) -> None:
        if self.engine.thread is None or not self.engine.thread.is_alive():
            raise RuntimeError("engine scheduler thread is not running")


def api_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
              ) -> JSONResponse:
    return JSONResponse(error_body(message, param, kind), status_code=status)


def build_fastapi(model_name: str, api_key: str | None, timeout_s: float) -> FastAPI:
    """The HTTP API over the engine deployment's handle, which the ingress replica registers at start."""

    def engine() -> Any:
        return registered_engine(model_name)

    app = FastAPI(title="forgeline", description="OpenAI-compatible completions over a forgeline model")
    registry = CollectorRegistry()
    requests_total = Counter("forgeline_requests_total", "HTTP requests", ["endpoint", "status"], registry=registry)
    tokens_total = Counter("forgeline_generated_tokens_total", "generated tokens", registry=registry)
    latency = Histogram("forgeline_request_seconds", "request latency", ["endpoint"], registry=registry)
    info_cache: dict[str, Any] = {}

    async def info() -> dict[str, Any]:
        if not info_cache:
            details = await engine().info.remote()
            info_cache.update(details, tokenizer=Tokenizer.from_str(details["tokenizer_json"]))
        return info_cache

    async def encode(text: str) -> list[int]:
        """Tokenized here, with the engine's own tokenizer: no round trip to the busy engine replica."""
        return (await info())["tokenizer"].encode(text, add_special_tokens=False).ids

    async def decode(ids: list[int]) -> str:
        return (await info())["tokenizer"].decode(ids, skip_special_tokens=False)

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next: Any) -> Any:
        started = time.time()
        path = request.url.path
        protected = "/v1/" in path or path.endswith(("/tokenize", "/detokenize"))
        if api_key and protected and request.headers.get("authorization") != f"Bearer {api_key}":
            response = api_error(401, "missing or invalid API key (Authorization: Bearer ...)", None,
                                 "authentication_error")
        else:
            response = await call_next(request)
        requests_total.labels(request.url.path, str(response.status_code)).inc()
        latency.labels(request.url.path).observe(time.time() - started)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return api_error(400, f"invalid JSON: {first.get('msg')}", "body")
        param = ".".join(location) or None
        return api_error(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param)

    def check_model(name: str) -> JSONResponse | None:
        if name != model_name:
            return api_error(400, f"model {name!r} does not exist; this server serves {model_name!r}", "model",
                             "invalid_request_error")
        return None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        details = await info()
        return {"status": "ok", "dtype": details["dtype"], "torch_threads": details["torch_threads"]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        details = await info()
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                             "owned_by": "forgeline", "max_model_len": details["max_model_len"]}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        details = await info()
        return {"tokenizer_class": details["tokenizer_class"], "model_max_length": details["max_model_len"],
                "vocab_size": details["vocab_size"], "eos_token": details["eos_token"],
                "bos_token": details["eos_token"], "eos_token_id": details["eos_token_id"]}

    @app.post("/tokenize")
    async def tokenize(body: dict[str, Any]) -> Any:
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            return api_error(400, "send {'prompt': '<text>'}", "prompt")
        ids = await encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": (await info())["max_model_len"]}

    @app.post("/detokenize")
    async def detokenize(body: dict[str, Any]) -> Any:
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            return api_error(400, "send {'tokens': [ids]}", "tokens")
        return {"prompt": await decode(ids)}

    @app.get("/engine_stats")
    async def engine_stats() -> dict[str, Any]:
        """One engine replica's counters (steps, busy seconds, tokens, running/waiting sequences)."""
        return await engine().stats.remote()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    async def run_one(prompt: str | list[int], params: SamplingParams) -> dict[str, Any]:
        payload = {k: v for k, v in params.__dict__.items() if k != "extra"}
        return await asyncio.wait_for(engine().generate.remote(prompt, payload), timeout=timeout_s)

    def failure(error: Exception) -> JSONResponse:
        if isinstance(error, RequestError):
            return api_error(400, str(error), error.param)
        if isinstance(error, asyncio.TimeoutError | TimeoutError):
            return api_error(408, f"request exceeded the {timeout_s:.0f} s timeout", None, "timeout")
        cause = getattr(error, "cause", None)
        if isinstance(cause, RequestError):
            return api_error(400, str(cause), cause.param)
        return api_error(500, f"internal error: {type(error).__name__}: {error}", None, "server_error")

    def validate(prompt: str | list[int], params: SamplingParams, context: int, vocab: int) -> None:
        count = len(prompt) if isinstance(prompt, list) else 0
        if isinstance(prompt, list) and any(not 0 <= t < vocab for t in prompt):
            raise RequestError("prompt", f"token ids must be in [0, {vocab})")
        if count:
            params.validate(count, context)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        if (bad := check_model(body.model)) is not None:
            return bad
        details = await info()
        prompts = prompts_of(body.prompt)
        prompt_ids = [p if isinstance(p, list) else await encode(p) for p in prompts]
        jobs = [(ids, completion_params(body, i)) for ids in prompt_ids for i in range(body.n)]
        try:
            for ids, params in jobs:
                validate(ids, params, details["max_model_len"], details["vocab_size"])
            if body.stream:
                return StreamingResponse(stream_completions(body, jobs), media_type="text/event-stream")
            results = await asyncio.gather(*(run_one(p, params) for p, params in jobs))
        except Exception as error:
            return failure(error)
        choices = []
        for index, result in enumerate(results):
            prefix, prompt = "", prompts[index // body.n]
            if body.echo:
                prefix = prompt if isinstance(prompt, str) else await decode(prompt)
            choice: dict[str, Any] = {"index": index, "text": prefix + result["text"],
                                      "finish_reason": result["finish_reason"], "logprobs": None}
            if body.logprobs is not None:
                choice["logprobs"] = completion_logprobs(result)
            choices.append(choice)
        prompt_tokens = sum(r["prompt_tokens"] for r in results[:: body.n])
        completion_tokens = sum(r["completion_tokens"] for r in results)
        tokens_total.inc(completion_tokens)
        return response_body("completion", model_name, choices, prompt_tokens, completion_tokens)

    async def merged(jobs: list[tuple[str | list[int], SamplingParams]]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """Events of several streams as they come, tagged with the choice index."""
        queue: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()

        async def pump(index: int, prompt: str | list[int], params: SamplingParams) -> None:
            payload = {k: v for k, v in params.__dict__.items() if k != "extra"}
            async for event in engine().options(stream=True).stream.remote(prompt, payload):
                await queue.put((index, event))
            await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, p, params)) for i, (p, params) in enumerate(jobs)]
        open_streams = len(tasks)
        while open_streams:
            index, event = await asyncio.wait_for(queue.get(), timeout=timeout_s)
            if event is None:
                open_streams -= 1
                continue
            yield index, event

    def sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def stream_completions(body: CompletionRequest, jobs: list[Any]) -> AsyncIterator[str]:
        ident, created = f"cmpl-{time.time_ns()}", int(time.time())
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        try:
            async for index, event in merged(jobs):
                choice: dict[str, Any] = {"index": index, "text": event.get("delta", ""), "logprobs": None,
                                          "finish_reason": None}
                if "done" in event:
                    choice["finish_reason"] = event["done"]["finish_reason"]
                    usage["prompt_tokens"] += event["done"]["prompt_tokens"]
                    usage["completion_tokens"] += event["done"]["completion_tokens"]
                yield sse({"id": ident, "object": "text_completion", "created": created, "model": model_name,
                           "choices": [choice]})
        except Exception as error:
            yield sse(error_body(str(error), getattr(error, "param", None)))
        tokens_total.inc(usage["completion_tokens"])
        yield sse({"id": ident, "object": "text_completion", "created": created, "model": model_name,
                   "choices": [], "usage": {**usage, "total_tokens": sum(usage.values())}})
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Any:
        if (bad := check_model(body.model)) is not None:
            return bad
        details = await info()
        prompt_ids = await encode(render_chat(body.messages))
        jobs = [(prompt_ids, chat_params(body, i, details["max_model_len"], len(prompt_ids))) for i in range(body.n)]
        try:
            for prompt, params in jobs:
                validate(prompt, params, details["max_model_len"], details["vocab_size"])
            if body.stream:
                return StreamingResponse(stream_chat(jobs), media_type="text/event-stream")
            results = await asyncio.gather(*(run_one(p, params) for p, params in jobs))
        except Exception as error:
            return failure(error)
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
        completion_tokens = sum(r["completion_tokens"] for r in results)
        tokens_total.inc(completion_tokens)
        return response_body("chat", model_name, choices, len(prompt_ids), completion_tokens)

    async def stream_chat(jobs: list[Any]) -> AsyncIterator[str]:
        ident, created = f"chatcmpl-{time.time_ns()}", int(time.time())
        started: set[int] = set()
        try:
            async for index, event in merged(jobs):
                delta: dict[str, Any] = {} if index in started else {"role": "assistant"}
                started.add(index)
                if event.get("delta"):
                    delta["content"] = event["delta"]
                finish = event["done"]["finish_reason"] if "done" in event else None
                yield sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name,
                           "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})
        except Exception as error:
            yield sse(error_body(str(error), getattr(error, "param", None)))
        yield "data: [DONE]\n\n"

    return app


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run serving.app:app_builder model=PATH` / `infra/serve.yaml`: the ingress bound to the engine."""
    model = str(Path(args["model"]).resolve())
    name = str(args.get("name", "forgeline"))
    api_key = args.get("api_key") or os.environ.get(API_KEY_ENV) or None
    timeout_s = float(args.get("request_timeout_s", 60))
    replicas = int(args.get("max_replicas", 1))
    logging = {"enable_access_log": bool(args.get("access_log", True)), "log_level": args.get("log_level", "INFO")}
    engine = serve.deployment(
        EngineServer, name="engine", max_ongoing_requests=int(args.get("max_ongoing_requests", 64)),
        logging_config=logging,
        autoscaling_config={"min_replicas": 1, "max_replicas": replicas, "target_ongoing_requests": 16},
        health_check_period_s=10, ray_actor_options={"num_cpus": float(args.get("engine_cpus", 1)),
                                                     "num_gpus": float(args.get("engine_gpus", 0))},
    ).bind(model, name, int(args.get("max_batch", 16)), str(args.get("dtype", "float32")))  # type: ignore[attr-defined]

    @serve.deployment(name="ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0},
                      logging_config=logging)
    @serve.ingress(build_fastapi(name, api_key, timeout_s))
    class APIIngress:
        def __init__(self, engine_handle: Any) -> None:
            register_engine(name, engine_handle)

    return APIIngress.bind(engine)  # type: ignore[attr-defined]
