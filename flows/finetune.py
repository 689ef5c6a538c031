"""The `finetune` stage: LoRA (or full) instruction tuning of a pretrain checkpoint on Ray Train, PEFT adapter.

Output `<run_dir>/finetune-<hash>/`: `_data/` (packed rows, held-out examples, `rejected.jsonl` with each bad
line's number and reason), `checkpoints/` (DCP; a LoRA run holds only adapters and their optimizer state),
`metrics.jsonl`, `loss.png`, `adapter/` (PEFT format + `forgeline_adapter.json` with the base weights' digest),
`merged/` when `finetune.merge` (or for `method: full`: the tuned model as an HF export), `comparison.json` and
`comparison.png` (base vs tuned on the held-out set) and the manifest.

The hash covers the finetune config (not workers or checkpoint cadence), the instruction files' contents and
the pretrain stage; a rerun of an unfinished stage resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray

from dataprep.evaluate.curves import loss_curve_png, read_metrics
from dataprep.finetune.report import comparison_markdown, comparison_png
from dataprep.ingest.inputs import file_fingerprint
from dataprep.shards import atomic_write_json
from dataprep.stage import CHECKPOINTS_DIR, TOKENIZER_DIR, StageDir, file_digest
from flows.common import injected_fault, publish_artifact
from flows.config import RunConfig
from flows.pretrain import run_trainer, steady_mean
from flows.stage import Computed, NotYetKnown, StageInputs, StageResult, StageSpec, stage_flow
from workers.checkpoint import latest_checkpoint, read_state, step_dir
from workers.finetune_config import FINETUNE_OPERATIONAL_FIELDS, FinetuneJob
from workers.finetune_data import ADAPTER_DIR
from workers.pretrain import read_resumes

DATA_DIR = "_data"
COMPARISON = "comparison.json"
COMPARISON_PNG = "comparison.png"
LOSS_PNG = "loss.png"
METRICS = "metrics.jsonl"


def data_fingerprint(location: str) -> str:
    """Content digest of a local file; for a URL, what the filesystem reports (`file_fingerprint`)."""
    if "://" not in location:
        if not Path(location).is_file():
            raise ValueError(f"finetune.data: no such file {location}")
        return file_digest(Path(location))
    return file_fingerprint(location)


def base_checkpoint(config: RunConfig, pretrain: StageDir) -> Path:
    """The pretrain checkpoint finetuning starts from (`finetune.checkpoint`: latest or a step)."""
    root = pretrain.path / CHECKPOINTS_DIR
    chosen = config.finetune.checkpoint
    found = latest_checkpoint(root) if chosen is None else step_dir(root, chosen)
    if found is None or not (found / "train_state.json").is_file():
        if not pretrain.is_complete():
            raise NotYetKnown("the pretrain checkpoint finetuning starts from")
        raise ValueError(f"finetune.checkpoint {chosen if chosen is not None else 'latest'}: no such complete "
                         f"checkpoint in {root}")
    return found


def seq_len(config: RunConfig, model: dict[str, Any]) -> int:
    length = config.finetune.seq_len or model["max_seq_len"]
    if length > model["max_seq_len"]:
        raise ValueError(f"finetune.seq_len {length} is larger than the model's context {model['max_seq_len']}")
    return int(length)


def finetune_job(config: RunConfig, pretrain: StageDir, stage_path: Path) -> FinetuneJob:
    checkpoint = base_checkpoint(config, pretrain)
    fault = injected_fault("finetune")
    return FinetuneJob(config=config.finetune, model=read_state(checkpoint)["model"], base_checkpoint=str(checkpoint),
                       data_dir=str(stage_path / DATA_DIR), out_dir=str(stage_path),
                       fault_step=fault.after if fault else None)


def tokenizer_dir(job: FinetuneJob) -> Path:
    """The tokenize stage's tokenizer the base model was trained with."""
    return Path(read_state(Path(job.base_checkpoint))["spec"]["data_dir"]).parent / TOKENIZER_DIR


class FinetuneStage(StageSpec):
    """Instruction JSONL + a pretrain checkpoint → a LoRA adapter (or a fully finetuned model), scored."""

    name = "finetune"
    code_version = "finetune-1"
    upstream = "pretrain"
    output_names = (CHECKPOINTS_DIR, METRICS, LOSS_PNG, ADAPTER_DIR, COMPARISON, COMPARISON_PNG)

    def resolve_inputs(self, config: RunConfig, upstream: StageDir | None) -> StageInputs:
        if upstream is None:
            raise ValueError("finetune: needs an upstream pretrain stage")
        settings = config.finetune
        if settings.data is None:
            raise ValueError("finetune.data: set the instruction JSONL to run the finetune stage")
        files = [settings.data] + ([settings.eval_data] if settings.eval_data else [])
        keys = [upstream.name] + [f"{location}|jsonl|{data_fingerprint(location)}" for location in files]
        manifest = [{"stage": upstream.name, "path": str(upstream.path)}] + [{"uri": f} for f in files]
        return StageInputs(keys, manifest, upstream)

    def params(self, config: RunConfig, inputs: StageInputs) -> dict[str, Any]:
        assert inputs.upstream is not None
        settings = config.finetune.model_dump(mode="json", exclude={"data", "eval_data", *FINETUNE_OPERATIONAL_FIELDS})
        return {**settings, "base_checkpoint": base_checkpoint(config, inputs.upstream).name}

    def check(self, config: RunConfig, inputs: StageInputs) -> None:
        assert inputs.upstream is not None
        job = finetune_job(config, inputs.upstream, Path("."))
        seq_len(config, job.model)

    def compute(self, config: RunConfig, stage: StageDir, inputs: StageInputs) -> Computed:
        """Prepare rows, train (resuming), export the adapter, score base vs tuned (all on Ray)."""
        from workers.finetune_data import compare_models, export_outputs, prepare_rows

        assert inputs.upstream is not None
        job = finetune_job(config, inputs.upstream, stage.path)
        tokenizer = tokenizer_dir(job)
        data_stats = ray.get(prepare_rows.remote(config.finetune.model_dump(mode="json"), str(tokenizer),
                                                 seq_len(config, job.model), job.data_dir))
        fit(config, job, stage)
        final = latest_checkpoint(stage.path / CHECKPOINTS_DIR)
        if final is None or read_state(final)["step"] != config.finetune.steps:
            raise RuntimeError(f"finetune: training ended without a final checkpoint in {stage.path}")
        outputs = ray.get(export_outputs.remote(job.model_dump(mode="json"), str(final), str(inputs.upstream.path),
                                             str(tokenizer), str(stage.path)))
        comparison = ray.get(compare_models.remote(job.model_dump(mode="json"), str(final), str(tokenizer)))
        atomic_write_json(stage.path / COMPARISON, comparison)
        return Computed({"data": data_stats}, {"latest": final.name, "exports": outputs})

    def finish(self, config: RunConfig, stage: StageDir, inputs: StageInputs, computed: Computed) -> Computed:
        rows = read_metrics(stage.path / METRICS)
        loss_curve_png(rows, stage.path / LOSS_PNG, f"finetune ({config.finetune.method}): {config.name}")
        comparison = json.loads((stage.path / COMPARISON).read_text())
        comparison_png(comparison, stage.path / COMPARISON_PNG, f"base vs tuned: {config.name}")
        last = rows[-1]
        stats = {**computed.stats["data"], "method": config.finetune.method, "steps": last["step"],
                 "trainable_parameters": last["trainable_parameters"], "parameters": last["parameters"],
                 "trainable_fraction": round(last["trainable_parameters"] / last["parameters"], 6),
                 "final_loss": round(last["loss"], 4), "final_val_loss": round(last["val_loss"], 4),
                 "tokens_per_s": round(steady_mean(rows, "tokens_per_s"), 1),
                 "peak_memory_mb": round(max(r["peak_memory_mb"] for r in rows), 1),
                 "resumed_from_steps": [record["from_step"] for record in read_resumes(stage.path)],
                 "comparison": {row["model"]: {k: round(row[k], 4) for k in ("held_out_loss", "exact_match", "chrf")}
                                for row in comparison}}
        return Computed(stats, {**computed.manifest, "comparison": comparison})

    def outputs(self, config: RunConfig, stage: StageDir, computed: Computed) -> dict[str, Any]:
        return {"checkpoints": {"path": CHECKPOINTS_DIR, "latest": computed.manifest["latest"]},
                "metrics": METRICS, "loss_curve": LOSS_PNG, "comparison": COMPARISON,
                "comparison_plot": COMPARISON_PNG, **computed.manifest["exports"]}

    def resources(self, config: RunConfig) -> dict[str, Any]:
        settings = config.finetune
        return {"train workers": settings.num_workers, "CPU per worker": settings.cpus_per_worker,
                "GPU per worker": 1 if settings.use_gpu else 0}

    def report(self, manifest: dict[str, Any], skipped: bool = False) -> None:
        publish_artifact(manifest, skipped, "\n## Base vs tuned (held-out)\n\n"
                         + comparison_markdown(manifest.get("comparison", [])))

    def summary(self, result: StageResult) -> list[str]:
        stats, path = result["stats"], result["path"]
        compare = stats["comparison"]
        return [f"{stats['method']}: {stats['trainable_parameters']:,} of {stats['parameters']:,} parameters trained "
                f"({100 * stats['trainable_fraction']:.2f} %), {stats['steps']} steps on {stats['train_examples']} "
                f"examples ({stats['bad_lines']} bad lines set aside)",
                f"held-out answer loss: base {compare['base']['held_out_loss']} → tuned "
                f"{compare['tuned']['held_out_loss']}; exact match {compare['base']['exact_match']} → "
                f"{compare['tuned']['exact_match']}; chrF {compare['base']['chrf']} → {compare['tuned']['chrf']}",
                f"adapter: {path}/{ADAPTER_DIR}; comparison: {path}/{COMPARISON_PNG}"]


def fit(config: RunConfig, job: FinetuneJob, stage: StageDir) -> None:
    """Ray Train's TorchTrainer over `job`, restarting failed workers from the latest checkpoint."""
    from workers.finetune import ray_train_loop

    settings = config.finetune
    run_trainer(ray_train_loop, job.model_dump(mode="json"), stage, settings.num_workers, settings.use_gpu,
                settings.cpus_per_worker, "PACK", settings.max_failures)


FINETUNE = FinetuneStage()
finetune_flow = stage_flow(FINETUNE)
