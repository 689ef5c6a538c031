"""The engine in its own process (`serving.engine_process`, behind `EngineServer`): the same tokens as the engine
in this process, deltas that add up to the text, bad requests answered with the field, aborted requests leaving
the batch, a start that fails with its reason, and a dead engine process failing requests and the health check."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from serving.app import EngineServer, engine_payload
from serving.engine import Engine
from serving.engine_process import TCMALLOC_NAMES, allocator_library
from serving.sampling import RequestError, SamplingParams
from tests.serving.test_http import assert_default_allocator, model_dir  # noqa: F401  (the tiny exported model fixture)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> EngineServer:  # noqa: F811
    return EngineServer(str(model_dir), name="tiny", max_batch=8, threads=1)


def params(**values: Any) -> dict[str, Any]:
    return engine_payload(SamplingParams(**values))


def test_outputs_equal_the_engine_in_this_process(server: EngineServer, model_dir: Path) -> None:  # noqa: F811
    jobs = [("the cat", params(max_tokens=12, temperature=0, ignore_eos=True)),
            ("a dog ran", params(max_tokens=9, temperature=0.8, seed=7, ignore_eos=True)),
            ("the sun", params(max_tokens=15, temperature=1.0, top_k=20, seed=3, ignore_eos=True))]

    async def run_all() -> list[dict[str, Any]]:  # concurrently: they share batches in the engine process
        return list(await asyncio.gather(*(server.generate(prompt, p) for prompt, p in jobs)))

    remote = asyncio.run(run_all())
    local = Engine.load(model_dir, name="tiny", max_batch=8)
    for (prompt, p), result in zip(jobs, remote, strict=True):
        alone = local.generate(local.encode(prompt), SamplingParams(**p))
        assert result["output_ids"] == alone.output_ids
        assert result["text"] == alone.text
        assert result["completion_tokens"] == p["max_tokens"]
        assert result["prompt_tokens"] == len(local.encode(prompt))


def test_stream_deltas_add_up_to_the_text(server: EngineServer) -> None:
    async def collect() -> tuple[str, dict[str, Any]]:
        text, done = "", {}
        async for event in server.stream("the cat", params(max_tokens=10, temperature=0, ignore_eos=True)):
            if "delta" in event:
                text += event["delta"]
            else:
                done = event["done"]
        return text, done

    text, done = asyncio.run(collect())
    assert text == done["text"] and done["completion_tokens"] == 10


def test_a_bad_request_is_answered_with_its_field(server: EngineServer) -> None:
    with pytest.raises(RequestError) as raised:
        asyncio.run(server.generate([1, 2, 3], params(max_tokens=5000)))  # past the 4,096-token context
    assert raised.value.param == "max_tokens"
    with pytest.raises(RequestError) as raised:
        asyncio.run(server.generate([1, 299 + 5], params(max_tokens=4)))
    assert raised.value.param == "prompt"


def test_a_cancelled_request_leaves_the_batch(server: EngineServer) -> None:
    async def cancel_midway() -> dict[str, Any]:
        before = await server.stats()
        task = asyncio.create_task(server.generate("the cat", params(max_tokens=400, ignore_eos=True)))
        while (await server.stats())["generated_tokens"] < before["generated_tokens"] + 5:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            stats = await server.stats()
            if stats["aborted"] == before["aborted"] + 1:
                return stats
            await asyncio.sleep(0.01)
        raise AssertionError(f"not aborted: {stats}")

    stats = asyncio.run(cancel_midway())
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_a_failed_start_raises_its_reason(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(Exception, match="adapter_config.json|no such file|not found|No such file"):
        EngineServer(str(model_dir), name="tiny", adapters={"broken": str(tmp_path / "missing")})


def test_a_dead_engine_process_fails_requests_and_the_health_check(model_dir: Path) -> None:  # noqa: F811
    doomed = EngineServer(str(model_dir), name="tiny", max_batch=2, threads=1)
    doomed.check_health()

    async def kill_midway() -> None:
        task = asyncio.create_task(doomed.generate("the cat", params(max_tokens=400, ignore_eos=True)))
        while (await doomed.stats())["generated_tokens"] < 3:
            await asyncio.sleep(0.01)
        doomed.core.process.kill()
        with pytest.raises(RuntimeError, match="engine process exited"):
            await asyncio.wait_for(task, 30)

    asyncio.run(kill_midway())
    with pytest.raises(RuntimeError, match="not running"):
        doomed.check_health()
    with pytest.raises(RuntimeError, match="engine process exited"):
        asyncio.run(doomed.generate("the cat", params(max_tokens=4)))


def test_allocator_settings() -> None:
    import ctypes.util

    assert allocator_library("system") is None
    found = [library for name in TCMALLOC_NAMES if (library := ctypes.util.find_library(name))]
    assert allocator_library("auto") == (found[0] if found else None)
    torch_gomp = str(Path(torch.__file__).parent / "lib" / "libgomp.so.1")
    assert allocator_library(torch_gomp) == torch_gomp
    with pytest.raises(ValueError, match="engine_allocator"):
        allocator_library("/no/such/libtcmalloc.so")


def test_the_engine_process_starts_with_its_allocator_preloaded(
        server: EngineServer, model_dir: Path) -> None:  # noqa: F811
    """"auto" (the module's server): TCMalloc mapped into the engine process exactly when this system has it; an
    explicit library (torch's own OpenMP runtime, present everywhere) mapped from its path."""
    assert_default_allocator(asyncio.run(server.info())["preloaded"])
    torch_gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    explicit = EngineServer(str(model_dir), name="tiny", max_batch=2, threads=1, allocator=str(torch_gomp))
    try:
        assert [Path(path).resolve() for path in asyncio.run(explicit.info())["preloaded"]] == [torch_gomp.resolve()]
    finally:
        explicit.core.close()
