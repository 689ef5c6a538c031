"""`forgeline` command line: the pipeline, one command per stage, and helpers (sample, status)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

import flows  # noqa: F401  (environment defaults before Prefect is imported)
from flows.config import STAGES, ConfigError, RunConfig, load_config
from flows.errors import PortInUseError, attach_log_file, explain, log_trace, quiet_console

app = typer.Typer(
    help="forgeline: raw web crawl → curated corpus → trained and served language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="run configuration (YAML)", show_default=False)]
AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="attach to a Ray cluster ('auto' or 'ray://host:10001') instead of local"),
]
LocalOpt = Annotated[bool, typer.Option("--local", help="start Ray locally on 127.0.0.1 (the default)")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print each stage's address, skip/run and why; compute "
                                         "nothing")]


def _load(config_path: Path, address: str | None, local: bool, connect: bool = True) -> RunConfig:
    """The config with --address/--local applied; with `connect`, a configured cluster address is reached now
    (a wrong one is one line before any stage starts; `validate` and dry runs never connect)."""
    if address and local:
        raise typer.BadParameter("give either --local or --address, not both")
    try:
        config = load_config(config_path)
    except ConfigError as error:
        typer.secho(str(error), fg="red", err=True)
        raise typer.Exit(2) from None
    if address or local:
        ray_cfg = config.ray.model_copy(update={"address": None if local else address})
        config = config.model_copy(update={"ray": ray_cfg})
    _RUN_DIR[0] = Path(config.run_dir)  # where an error's full trace goes (created only then: a dry run writes nothing)
    if connect and config.ray.address:
        from flows.common import connect_ray

        _run(connect_ray, config)
    return config


_RUN_DIR: list[Path | None] = [None]


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `fn`; an error the user can fix (see `flows.errors.explain`) is one red line and exit code 2, its
    full trace in the run's log file. Anything else keeps its traceback."""
    quiet_console()
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        message = explain(error)
        if message is None:
            raise
        log_path = attach_log_file(_RUN_DIR[0])  # a command without a config: $FORGELINE_HOME/logs
        log_trace(f"{getattr(fn, '__name__', fn)} failed: {message}")
        typer.secho(f"error: {message} (full trace: {log_path})", fg="red", err=True)
        raise typer.Exit(2) from None


def _report(results: dict[str, Any]) -> None:
    """Per stage: done or skipped, where its output is, its counts, then the stage's own summary lines."""
    from flows.pipeline import SPECS

    for stage, result in results.items():
        stats = result["stats"]
        typer.echo(f"{stage}: {'skipped (already complete)' if result['skipped'] else 'done'}")
        typer.echo(f"  output:   {result['path']}")
        typer.echo(f"  manifest: {result['path']}/manifest.json")
        if "records_in" in stats:
            typer.echo(f"  records in {stats['records_in']:,} → out {stats['records_out']:,}; "
                       f"dropped {json.dumps(stats['dropped'], sort_keys=True)}")
        for line in SPECS[stage].summary(result):
            typer.echo(f"  {line}")
    typer.echo("Prefect UI: `make ui`, then http://127.0.0.1:4200 (flow runs and their stats artifacts)")


def _run_pipeline(config: Path, until: str | None, address: str | None, local: bool, dry_run: bool
                  ) -> tuple[RunConfig, dict[str, Any]]:
    """The one path behind `run` and every stage command: plan (dry run) or run up to `until`."""
    from flows.pipeline import format_plan, pipeline_flow, plan_pipeline, stages_until

    cfg = _load(config, address, local, connect=not dry_run)
    _run(stages_until, until)
    _run(_check_protocols, cfg.ingest.inputs)
    if dry_run:
        typer.echo(format_plan(_run(plan_pipeline, cfg, until)))
        return cfg, {}
    results = _run(pipeline_flow, cfg, until)
    _report(results)
    return cfg, results


@app.command()
def run(
    config: ConfigArg,
    until: Annotated[str | None, typer.Option(help=f"stop after this stage ({', '.join(STAGES)})")] = None,
    address: AddressOpt = None,
    local: LocalOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Run the whole pipeline, skipping complete stages (--dry-run: print the plan, compute nothing)."""
    _run_pipeline(config, until, address, local, dry_run)


STAGE_HELP = {
    "ingest": "Ingest WARC/WET/JSONL/Parquet inputs into Parquet document shards.",
    "dedup": "Remove exact, URL and near-duplicate documents (runs earlier stages if needed).",
    "filter": "Quality, language and toxicity filtering with a per-rule audit (runs earlier stages if needed).",
    "tokenize": "Train the BPE tokenizer and pack token windows (runs earlier stages if needed).",
    "pretrain": "Pretrain with FSDP2 on Ray Train; resumes from the latest checkpoint (runs earlier stages).",
    "finetune": "Instruction-tune the pretrained model with LoRA (or fully) on Ray Train; writes a PEFT adapter.",
}


def _stage_command(stage: str) -> Any:
    def command(config: ConfigArg, address: AddressOpt = None, local: LocalOpt = False,
                dry_run: DryRunOpt = False) -> None:
        _run_pipeline(config, stage, address, local, dry_run)

    command.__doc__ = STAGE_HELP[stage]
    return command


for _stage in STAGE_HELP:
    app.command(name=_stage)(_stage_command(_stage))


@app.command(name="rag")
def rag_command(
    config: ConfigArg,
    evaluate: Annotated[bool, typer.Option("--eval", help="then score retrieval on questions taken from the "
                                           "chunks: hit@1/5/10 and MRR of dense, BM25 and hybrid")] = False,
    address: AddressOpt = None,
    local: LocalOpt = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Chunk, embed (Ray actors) and index (FAISS + BM25) the filtered documents (runs earlier stages if needed)."""
    from flows.rag import rag_eval_flow

    cfg, results = _run_pipeline(config, "rag", address, local, dry_run)
    if evaluate and results:
        scored = _run(rag_eval_flow, cfg, results["rag"]["path"])
        typer.echo(f"retrieval ({scored['path']}/results.json, plot {scored['path']}/retrieval.png):")
        typer.echo("\n".join("  " + line for line in scored["table"].splitlines()))


@app.command()
def evaluate(
    config: ConfigArg,
    run: Annotated[Path | None, typer.Option(help="a pretrain stage directory (default: this config's)")] = None,
    watch: Annotated[bool, typer.Option(help="keep polling for new checkpoints until training completes")] = False,
    timeout: Annotated[float | None, typer.Option(help="stop watching after this many seconds")] = None,
    address: AddressOpt = None,
    local: LocalOpt = False,
) -> None:
    """Evaluate every checkpoint not yet evaluated: perplexity, few-shot tasks, BLEU/chrF/ROUGE."""
    from flows.evaluate import evaluate_flow

    if run is None:
        if watch:
            raise typer.BadParameter("--watch needs --run PRETRAIN_DIR (the stage being trained)")
        _run_pipeline(config, "evaluate", address, local, False)
        return
    cfg = _load(config, address, local)
    _report({"evaluate": _run(evaluate_flow, cfg, str(run.resolve()), watch, timeout)})


@app.command()
def serve(
    config: ConfigArg,
    model: Annotated[Path | None, typer.Option(help="pretrain stage, HF export or checkpoint (default: this run's)")]
    = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port on 127.0.0.1")] = 8000,
    once: Annotated[bool, typer.Option("--once", help="answer one example request, then stop (the demo)")] = False,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 (weights and KV cache)")] = "float32",
    engine_cpus: Annotated[float, typer.Option(help="CPUs per engine replica")] = 1.0,
    colocate: Annotated[bool, typer.Option("--colocate/--separate-engine", help="the engine in each HTTP ingress "
                                           "replica (measured faster), or a deployment of its own whose lost "
                                           "replicas' requests are rerun")] = True,
    max_batch: Annotated[int, typer.Option(min=1, help="sequences decoded together per engine replica")] = 64,
    replicas: Annotated[int, typer.Option(min=1, help="autoscale the engine up to this many replicas")] = 1,
    engine_threads: Annotated[int | None, typer.Option(min=1, help="torch threads of an engine replica's large "
                                                       "steps; small steps use one (default: local mode the "
                                                       "machine's CPUs (Ray's num_cpus; with --proxy-only the "
                                                       "engine's CPUs), a cluster the engine's CPUs)")]
    = None,
    prefix_cache_mb: Annotated[float, typer.Option(min=0, help="KV memory for shared prompt prefixes "
                                                   "(0: no prefix caching)")] = 256.0,
    engine_allocator: Annotated[str, typer.Option(help="the engine process's allocator: auto (TCMalloc where the "
                                                  "system has it), system (malloc), or a library's absolute path")]
    = "auto",
    max_pending: Annotated[int, typer.Option(min=1, help="requests held before answering 429")] = 256,
    timeout: Annotated[float, typer.Option(help="seconds before a request answers 408")] = 60.0,
    rag: Annotated[bool, typer.Option("--rag", help="also serve retrieval over this run's rag index "
                                      "(/v1/retrieve, /v1/rag/completions)")] = False,
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=PATH: serve a PEFT LoRA adapter as model NAME "
                                                      "(repeatable; default: this run's finetune adapter)")] = None,
    throughput_optimized: Annotated[bool | None, typer.Option(
        "--throughput-optimized/--proxy-only", help="Ray Serve's high-throughput mode (default in local mode): each "
        "replica also answers on its own 127.0.0.1 port (PORT+1, ...) without the proxy's hop; --proxy-only: "
        "requests through Serve's proxy only")] = None,
    address: AddressOpt = None,
    local: LocalOpt = False,
) -> None:
    """Serve the model with Ray Serve: OpenAI-compatible API on 127.0.0.1 (runs earlier stages if needed).

    With `finetune` configured (and no --model), this run's adapter is served beside the base model, by the name
    `finetune.adapter_name`. Set FORGELINE_API_KEY to require `Authorization: Bearer <key>` on /v1/ routes."""
    import signal
    import time

    from flows.deploy import deploy_flow
    from flows.pipeline import pipeline_flow

    cfg = _load(config, address, local)
    local_mode = cfg.ray.address is None
    if local_mode:  # local mode serves on this machine's loopback
        _run(_check_port, port)
    if throughput_optimized is None:
        throughput_optimized = local_mode
    if engine_threads is None and local_mode and throughput_optimized:
        # the one compute-heavy process of a local server; through the proxy the proxy needs a core (RESULTS)
        engine_threads = cfg.ray.num_cpus or os.cpu_count() or 1
    if throughput_optimized:
        if not local_mode:
            raise typer.BadParameter("--throughput-optimized starts Ray with it; on a cluster set "
                                     "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the cluster's environment")
        from flows.deploy import throughput_optimized_env

        _run(_check_port, port + 1)  # the first replica's direct-ingress port
        os.environ.update(throughput_optimized_env(port))  # before anything starts Ray
    if model is not None:
        _run(_check_model, model)
    adapters = _run(_adapter_options, adapter or [])
    if model is None and cfg.finetune.enabled and not adapter:
        stages = _run(pipeline_flow, cfg, "finetune")
        adapters = {cfg.finetune.adapter_name: str(Path(stages["finetune"]["path"]) / "adapter")}
        model = Path(stages["pretrain"]["path"])
    target = model or Path(_run(pipeline_flow, cfg, "pretrain")["pretrain"]["path"])
    args: dict[str, Any] = {"model": str(target.resolve()), "dtype": dtype, "engine_cpus": engine_cpus,
                            "adapters": adapters, "colocate": colocate,
                            "max_batch": max_batch, "max_replicas": replicas, "request_timeout_s": timeout,
                            "engine_threads": engine_threads, "prefix_cache_mb": prefix_cache_mb,
                            "engine_allocator": engine_allocator,
                            "max_pending_requests": max_pending}
    if rag:
        args["rag"] = _run(pipeline_flow, cfg, "rag")["rag"]["path"]
        args["rag_embedding_model"] = cfg.rag.model_path()
        args["rag_hybrid"] = cfg.rag.hybrid.model_dump()
        args["rag_max_k"] = cfg.rag.max_k
    result = _run(deploy_flow, cfg, args, port, True)
    typer.echo(f"serving {target} at {result['url']} (OpenAI API: {result['url']}/v1, docs: {result['url']}/docs)")
    if "direct_url" in result:
        typer.echo(f"direct ingress (first replica, no proxy hop): {result['direct_url']}/v1")
    typer.echo(f"$ {result['curl']}")
    typer.echo(json.dumps(result["answer"], indent=2))
    if once:
        return
    typer.echo("Ctrl-C (or SIGTERM) to stop")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM shuts down like Ctrl-C: no orphans
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


def _adapter_options(options: list[str]) -> dict[str, str]:
    """`--adapter NAME=PATH` options → {name: path}; each PATH must be a PEFT adapter directory."""
    adapters = {}
    for option in options:
        name, sep, path = option.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--adapter {option!r}: use NAME=PATH")
        _require_file(Path(path) / "adapter_config.json", f"--adapter {name}: a PEFT adapter directory")
        adapters[name] = str(Path(path).resolve())
    return adapters


def _check_protocols(inputs: list[str]) -> None:
    """An ImportError naming the package (s3fs, gcsfs, ...) for an input URL whose fsspec protocol is not installed,
    before any stage starts."""
    import fsspec
    from fsspec.core import split_protocol

    for location in inputs:
        for part in location.split("::"):  # chained URLs: simplecache::s3://...
            protocol, _ = split_protocol(part)
            if protocol and protocol not in ("file", "local"):
                fsspec.get_filesystem_class(protocol)


def _require_file(path: Path, what: str) -> None:
    """FileNotFoundError naming `path` and `what` it should be, unless it is a file."""
    if not path.is_file():
        raise FileNotFoundError(2, what, str(path))


def _check_port(port: int) -> None:
    """PortInUseError naming the port when 127.0.0.1:`port` cannot be bound."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Serve's server does: TIME_WAIT is no clash
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise PortInUseError(f"port {port} is in use ({error.strerror}): choose another with --port") from None


def _check_model(model: Path) -> None:
    """FileNotFoundError unless `model` is an HF export, a checkpoint or a pretrain stage directory."""
    from dataprep.stage import CHECKPOINTS_DIR, HF_DIR

    candidates = (model / HF_DIR / "config.json", model / "config.json", model / "train_state.json",
                  model / CHECKPOINTS_DIR)
    if not model.exists():
        raise FileNotFoundError(2, "no such file or directory (--model)", str(model))
    if not any(candidate.exists() for candidate in candidates):
        raise FileNotFoundError(2, "not an HF export, checkpoint or pretrain stage directory (--model)", str(model))


@app.command()
def plan(
    model: Annotated[str, typer.Option(help="preset: tiny, small, 125m, 350m, 760m, 1b, 7b")] = "1b",
    gpus: Annotated[int, typer.Option(min=1, help="data-parallel GPUs (FSDP shards over all of them)")] = 8,
    dtype: Annotated[str, typer.Option(help="bf16 or fp32")] = "bf16",
    gpu: Annotated[str, typer.Option(help="H100, H200, A100, L40S, L4, A10G, A10, V100")] = "H100",
    micro_batch: Annotated[int, typer.Option(min=1, help="sequences per GPU per step")] = 8,
    seq_len: Annotated[int | None, typer.Option(help="default: the preset's context")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="default: the preset's")] = None,
    mfu: Annotated[float, typer.Option(min=0.01, max=1.0, help="model FLOPs utilisation assumed for the time")] = 0.4,
    tokens: Annotated[float | None, typer.Option(help="training tokens (default: 20 per parameter)")] = None,
    activation_checkpointing: Annotated[bool, typer.Option(help="recompute activations in the backward pass")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Memory per GPU (with and without FSDP), Chinchilla tokens, 6·N·D FLOPs and time at an MFU."""
    from workers.model_config import model_config
    from workers.planner import PlanInputs, format_plan
    from workers.planner import plan as make_plan

    if dtype not in ("bf16", "fp32"):
        raise typer.BadParameter("--dtype: bf16 or fp32")
    config = _run(model_config, model, vocab_size=vocab_size)
    result = _run(make_plan, PlanInputs(config, gpus, dtype, micro_batch, seq_len, activation_checkpointing, gpu,
                                        mfu, tokens))
    typer.echo(json.dumps(result, indent=2) if as_json else format_plan(result))


@app.command(name="train-quality")
def train_quality(config: ConfigArg, address: AddressOpt = None, local: LocalOpt = False) -> None:
    """Train the fastText quality classifier of `filter.train_quality` (negatives default to the dedup output)."""
    from flows.pipeline import pipeline_flow
    from flows.train import train_quality_flow

    cfg = _load(config, address, local)
    training = cfg.filter.train_quality
    if training is None:
        typer.secho(f"{config}: set filter.train_quality (positives, output) first", fg="red", err=True)
        raise typer.Exit(2)
    negatives = training.negatives
    if negatives is None:
        negatives = [str(Path(_run(pipeline_flow, cfg, "dedup")["dedup"]["path"]) / "data")]
    metrics = _run(train_quality_flow, training, negatives, cfg.ray)
    typer.echo(json.dumps(metrics, indent=2))


@app.command(name="train-toxicity")
def train_toxicity(
    labels: Annotated[Path, typer.Argument(help="Jigsaw-layout CSV: comment_text (or text), toxic (0/1)")],
    out: Annotated[Path, typer.Option(help="where the fastText model goes")],
    epoch: Annotated[int, typer.Option(min=1, help="passes over the training examples")] = 25,
    quantize: Annotated[bool, typer.Option(help="write a small quantised .ftz model")] = True,
) -> None:
    """Train a fastText toxicity classifier (labels toxic / clean) on local Ray, with held-out scores."""
    from flows.config import RayConfig
    from flows.train import train_toxicity_flow

    _run(_require_file, labels, f"the labels CSV; `forgeline label-toxicity {labels}` writes one")
    metrics = _run(train_toxicity_flow, labels, out, RayConfig(), 0.2, epoch, 0, quantize)
    typer.echo(json.dumps(metrics, indent=2))


@app.command(name="label-toxicity")
def label_toxicity(
    out: Annotated[Path, typer.Argument(help="Jigsaw-layout CSV to write")],
    sentences: Annotated[int, typer.Option(min=10, help="real sentences to label")] = 20_000,
) -> None:
    """Distil alt-profanity-check into Jigsaw-layout labels on real sentences (needs the `labels` extra)."""
    from dataprep.filter.fasttext_models import Blocklist, default_blocklist_path
    from dataprep.filter.training_data import profanity_distilled_examples, sentences_of, write_jigsaw
    from dataprep.sample.prose import iter_articles

    texts = sentences_of(" ".join(article.paragraphs) for article in iter_articles())[:sentences]
    bad_words = sorted(Blocklist.load(default_blocklist_path()).words)
    examples = _run(profanity_distilled_examples, texts, bad_words)
    write_jigsaw(out, examples)
    toxic = sum(label == "toxic" for label, _ in examples)
    typer.echo(f"label-toxicity: {len(examples):,} sentences ({toxic:,} toxic by alt-profanity-check) → {out}")


@app.command()
def sample(
    out_dir: Annotated[Path, typer.Argument(help="directory for the sample crawl")],
    pages: Annotated[int, typer.Option(min=0, help="English prose pages to write (0 = all available)")] = 0,
) -> None:
    """Build the bundled, deterministic sample crawl (offline) used by the demo."""
    from dataprep.sample.build import build_sample

    summary = build_sample(out_dir, prose_pages=pages or None)
    kinds = ", ".join(f"{k}={v}" for k, v in summary["kinds"].items())
    rewritten = ", ".join(summary["written"]) or "none"
    typer.echo(f"sample: {summary['pages']} pages in {summary['out_dir']} ({kinds}); rewritten: {rewritten}")


@app.command()
def validate(config: ConfigArg) -> None:
    """Check a config file and print it with every default filled in."""
    cfg = _load(config, None, False, connect=False)
    typer.echo(cfg.model_dump_json(indent=2))


def main() -> None:
    """Entry point for `python -m flows.cli`."""
    app(prog_name="forgeline")


if __name__ == "__main__":
    main()
