"""The engine in a process of its own, beside the Serve replica that feeds it (as vLLM runs its EngineCore
process beside its API server).

In one process, the engine's scheduler thread and the replica's request handling (HTTP, Ray calls, asyncio)
take turns on one interpreter lock: measured on 2 cores, a `small` step at one client took 7.1 ms in the replica
against 5.8 ms alone, and at 64 clients of the demo model 8.9 ms for 45 rows against 7.7 ms for 64 alone.
Here the engine process does nothing but steps; the replica process receives requests and answers them.

- `EngineProcess` (replica side) starts `python -m serving.engine_process` with two pipes: commands in (submit,
  abort, calls of `info`/`stats`), events out. A reader thread takes each batch of events (one message per engine
  step, not one per token or request) and hands it to the replica's event loop in one call.
- The engine process starts with TCMalloc preloaded where the system has it (`allocator_library`), as vLLM's CPU
  guide prescribes for its engine: per-step temporaries then come from per-thread caches instead of glibc's
  malloc (measured: `benchmarks/RESULTS.md`).
- `serve_engine` (engine side) loads the model, answers `ready` (or `failed` with the reason, e.g. an adapter
  that does not fit), then loops: take the commands waiting, run one step, send that step's events. A request's
  finished result crosses as plain data (`result_dict`). The process exits when the replica's end of a pipe
  closes (the replica stopped or died).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from serving.engine import Engine
from serving.engine import Request as EngineRequest
from serving.sampling import SamplingParams

Prompt = str | list[int]
EventHandler = Callable[[str, Any], None]
FINAL_EVENTS = ("done", "error", "reply")
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")  # Debian/Ubuntu libtcmalloc-minimal4, gperftools


def allocator_library(setting: str) -> str | None:
    """The library the engine process preloads as its allocator (`LD_PRELOAD`) for `ServeArgs.engine_allocator`:
    "auto": TCMalloc where the system has it (Linux; else None), "system": None (the C library's malloc), anything
    else a path to a shared library, which must exist (ValueError naming the field)."""
    if setting == "system":
        return None
    if setting == "auto":
        if sys.platform != "linux":
            return None
        return next((found for name in TCMALLOC_NAMES if (found := ctypes.util.find_library(name))), None)
    if not Path(setting).is_file():
        raise ValueError(f"engine_allocator: no shared library at {setting!r} (or 'auto', 'system')")
    return setting


def preloaded_libraries() -> list[str]:
    """The files of this process's `LD_PRELOAD` entries that are mapped into it (what the loader really loaded)."""
    wanted = {Path(entry).name for entry in os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if entry}
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    mapped = {line.split(None, 5)[5] for line in maps if len(line.split(None, 5)) == 6}
    return sorted(path for path in mapped if Path(path).name in wanted or any(
        Path(path).name.startswith(name + ".") for name in wanted))


def result_dict(engine: Engine, request: EngineRequest) -> dict[str, Any]:
    """A finished engine request as plain data (it crosses the process boundary to the replica)."""
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
            "extra": request.extra, "timing": request.timing(), "cached_tokens": request.cached_tokens}


def portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (RequestError and AdapterError do), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def load_engine(model: str, name: str, max_batch: int, dtype: str, prefix_cache_mb: float,
                adapters: dict[str, str], threads: int | None = None, prepack: bool = True) -> Engine:
    # `threads` None: Ray's OMP_NUM_THREADS for the replica (its CPUs); small steps still run on one
    engine = Engine.load(Path(model), name=name, max_batch=max_batch, dtype=dtype, prefix_cache_mb=prefix_cache_mb,
                         threads=threads or torch.get_num_threads(), prepacked=prepack)
    for adapter, directory in adapters.items():  # a mismatched adapter fails the start (AdapterError)
        engine.add_adapter(adapter, Path(directory))
    return engine


class EngineCore:
    """The engine side: requests by the replica's ids, events collected per step."""

    def __init__(self, engine: Engine, events: Connection) -> None:
        self.engine, self.events = engine, events
        self.requests: dict[int, EngineRequest] = {}
        self.outbox: list[tuple[int, str, Any]] = []
        self.lock = threading.Lock()  # a beam search emits from the engine's beam thread

    def emitter(self, request_id: int, deltas: bool = True) -> EventHandler:
        """The engine's event callback for one request: its final event (and its deltas when `deltas`: only a
        stream reads them) into this step's batch."""
        def emit(kind: str, payload: Any) -> None:
            if kind == "delta" and not deltas:
                return
            if kind == "done":
                payload = result_dict(self.engine, payload)
            elif kind == "error":
                payload = portable(payload)
            with self.lock:
                if kind in FINAL_EVENTS:
                    self.requests.pop(request_id, None)
                self.outbox.append((request_id, kind, payload))
        return emit

    def handle(self, command: tuple[Any, ...]) -> None:
        kind, ident = command[0], command[1]
        if kind == "submit":
            prompt, params, stream = command[2], command[3], command[4]
            try:
                ids = self.engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
                self.requests[ident] = self.engine.submit(ids, SamplingParams(**params), self.emitter(ident, stream))
            except Exception as error:  # a bad request (RequestError) goes back to its caller
                self.emitter(ident)("error", error)
        elif kind == "abort":
            request = self.requests.get(ident)
            if request is not None:
                self.engine.abort(request)
        elif kind == "call":
            self.emitter(ident)("reply", getattr(self, command[2])())

    def info(self) -> dict[str, Any]:
        engine, tokenizer = self.engine, self.engine.tokenizer
        return {"name": engine.name, "max_model_len": engine.config.max_seq_len,
                "vocab_size": tokenizer.get_vocab_size(), "eos_token": tokenizer.id_to_token(engine.eot_id),
                "eos_token_id": engine.eot_id, "tokenizer_class": "PreTrainedTokenizerFast",
                "tokenizer_json": tokenizer.to_str(), "stats": dict(engine.stats),
                "torch_threads": engine.threads, "preloaded": preloaded_libraries(),
                "dtype": str(engine.dtype).removeprefix("torch."),
                "adapters": sorted(engine.adapters), "chat_template": engine.chat_template}

    def stats(self) -> dict[str, Any]:
        """Counters since the engine started: requests, prompt/generated tokens, steps, seconds busy in steps."""
        prefix = self.engine.prefix_cache
        return {**self.engine.stats, **self.engine.occupancy(), "max_batch": self.engine.max_batch,
                "prefix_cache": None if prefix is None else dict(prefix.stats.__dict__)}

    def flush(self) -> None:
        with self.lock:
            batch, self.outbox = self.outbox, []
        if batch:
            self.events.send(batch)

    def run(self, commands: Connection) -> None:
        """Until the replica goes away: take the waiting commands, step, send the step's events."""
        engine = self.engine
        while True:
            working = bool(engine.running) or not engine.waiting.empty()
            # idle: block for the next command; a beam search running on its own thread is polled for events
            timeout: float | None = 0 if working else (0.005 if self.requests else None)
            try:
                while commands.poll(timeout):
                    self.handle(commands.recv())
                    timeout = 0
            except (EOFError, OSError):
                return
            if engine.running or not engine.waiting.empty():
                engine.step()
            try:
                self.flush()
            except (BrokenPipeError, OSError):
                return


def serve_engine(commands_fd: int, events_fd: int) -> None:
    """The engine process's main: options arrive as the first command."""
    commands, events = Connection(commands_fd, writable=False), Connection(events_fd, readable=False)
    options: dict[str, Any] = commands.recv()
    try:
        engine = load_engine(**options)
    except Exception as error:
        events.send(("failed", portable(error)))
        return
    events.send(("ready", None))
    EngineCore(engine, events).run(commands)


class EngineProcess:
    """The replica side: starts the engine process and routes its events to each request's handler on the
    replica's event loop."""

    def __init__(self, options: dict[str, Any], start_timeout_s: float = 900.0, preload: str | None = None) -> None:
        """`preload`: a library the engine process starts with (`allocator_library`)."""
        commands_read, commands_write = os.pipe()
        events_read, events_write = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        if preload:
            env["LD_PRELOAD"] = ":".join(entry for entry in (preload, env.get("LD_PRELOAD")) if entry)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.engine_process", str(commands_read), str(events_write)],
            pass_fds=(commands_read, events_write), env=env)
        os.close(commands_read)
        os.close(events_write)
        self.commands, self.events = Connection(commands_write, readable=False), Connection(events_read, writable=False)
        self.commands.send(options)
        if not self.events.poll(start_timeout_s):
            self.process.kill()
            raise RuntimeError(f"the engine process did not start within {start_timeout_s:.0f} s")
        status, error = self.events.recv()
        if status != "ready":
            self.process.wait(30)
            raise error
        self.handlers: dict[int, EventHandler] = {}
        self.ids = itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exited = threading.Event()  # its events pipe closed: the process is gone (or going) even before reaped
        self.reader = threading.Thread(target=self._read, name="forgeline-engine-events", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                batch = self.events.recv()
            except (EOFError, OSError):  # the engine process exited: its requests fail now, not at a timeout
                self.exited.set()
                self._call_on_loop(self._fail_all)
                return
            self._call_on_loop(self._dispatch, batch)

    def _call_on_loop(self, function: Callable[..., None], *args: Any) -> None:
        """Run `function(*args)` on the loop the commands came from (none left to tell once it closed)."""
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed between the check and the call
                self.loop.call_soon_threadsafe(function, *args)

    def _dispatch(self, batch: list[tuple[int, str, Any]]) -> None:
        for ident, kind, payload in batch:
            handler = self.handlers.pop(ident, None) if kind in FINAL_EVENTS else self.handlers.get(ident)
            if handler is not None:
                handler(kind, payload)

    def _fail_all(self) -> None:
        handlers, self.handlers = self.handlers, {}
        for handler in handlers.values():
            handler("error", RuntimeError(f"the engine process exited (code {self.process.poll()})"))

    def _send(self, kind: str, handler: EventHandler, *args: Any) -> int:
        """Send command `kind` under a new id whose events go to `handler`."""
        if not self.alive():
            raise RuntimeError(f"the engine process exited (code {self.process.poll()})")
        self.loop = asyncio.get_running_loop()
        ident = next(self.ids)
        self.handlers[ident] = handler
        self.commands.send((kind, ident, *args))
        return ident

    def submit(self, prompt: Prompt, params: dict[str, Any], on_event: EventHandler, stream: bool = False) -> int:
        """Queue a generation; `on_event(kind, payload)` gets its deltas (only when `stream`), then `done` (the
        result dict) or `error`, on the event loop this is called from."""
        return self._send("submit", on_event, prompt, params, stream)

    def abort(self, ident: int) -> None:
        """Free the request's row if it is still running (a no-op once it finished)."""
        if ident in self.handlers and self.alive():
            self.handlers.pop(ident)
            self.commands.send(("abort", ident))

    async def call(self, name: str) -> Any:
        """`info` or `stats` of the engine."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(kind: str, payload: Any) -> None:
            if not future.done():
                future.set_exception(payload) if kind == "error" else future.set_result(payload)
        self._send("call", settle, name)
        return await future

    def alive(self) -> bool:
        """False once the process has exited or closed its events pipe (a dying process closes its files before
        it can be reaped, so `poll` alone can still say running after its requests failed)."""
        return not self.exited.is_set() and self.process.poll() is None

    def close(self) -> None:
        self.commands.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


if __name__ == "__main__":
    serve_engine(int(sys.argv[1]), int(sys.argv[2]))
