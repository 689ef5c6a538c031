"""The finetune stage's Ray tasks around training: preparing the packed rows, and scoring base against tuned.

`prepare_rows` reads the instruction JSONL (bad lines counted and written to `rejected.jsonl` with their line
and reason), splits a held-out part by a hash of each example (unless a separate file is given), tokenizes with
the chat template and a completion-only mask, fits examples to the context (truncate or drop, counted) and packs
them. `compare_models` scores the base and the tuned model on the held-out examples: per-answer-token loss and,
for generated answers (greedy, stopping at end-of-text), exact match and chrF.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import xxhash

from dataprep.evaluate.tasks import generation_scores
from dataprep.finetune.chat import render_chat
from dataprep.finetune.examples import FitResult, PackedRows, fit_to_context, pack, tokenize_example
from dataprep.finetune.instructions import InstructionSet, Messages, read_instructions
from dataprep.shards import atomic_write_bytes, atomic_write_json
from dataprep.stage import CHECKPOINTS_DIR, HF_DIR
from dataprep.tokenize.tokenizer import EOT_TOKEN, load_tokenizer
from workers.checkpoint import latest_checkpoint
from workers.decoder import Decoder
from workers.evaluate import greedy_generate
from workers.export import weights_digest, write_hf
from workers.finetune import base_model, export_adapter, load_rows, merged_transformer, save_rows, summed_loss
from workers.finetune_config import FinetuneConfig, FinetuneJob
from workers.model import Transformer

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
BASE_DIR = "base"
DATA_STATS = "data_stats.json"
REJECTED = "rejected.jsonl"
VAL_EXAMPLES = "val_examples.jsonl"


def _held_out(messages: Messages, fraction: float, seed: int) -> bool:
    key = json.dumps(messages, sort_keys=True).encode()
    return xxhash.xxh64_intdigest(key, seed=seed) / 2**64 < fraction


def split(config: FinetuneConfig, data: InstructionSet) -> tuple[list[Messages], list[Messages], InstructionSet | None]:
    """(train, held-out, the separate held-out file's parse) — a hash split of `data` unless eval_data is set."""
    if config.eval_data is not None:
        held = read_instructions(config.eval_data)
        return data.examples, held.examples, held
    train = [m for m in data.examples if not _held_out(m, config.holdout, config.seed)]
    val = [m for m in data.examples if _held_out(m, config.holdout, config.seed)]
    return train, val, None


def _fit(tokenizer: Any, examples: list[Messages], seq_len: int, config: FinetuneConfig) -> FitResult:
    return fit_to_context([tokenize_example(tokenizer, m, EOT_TOKEN) for m in examples], seq_len, config.overlong)


@ray.remote(num_cpus=1, max_retries=2)
def prepare_rows(config: dict[str, Any], tokenizer_dir: str, seq_len: int, out_dir: str) -> dict[str, Any]:
    """Instruction JSONL → `train.npz`, `val.npz`, `val_examples.jsonl`, `rejected.jsonl`, `data_stats.json`."""
    settings = FinetuneConfig.model_validate(config)
    out = Path(out_dir)
    if (out / DATA_STATS).is_file():  # a retry or rerun: the rows are already there
        return dict(json.loads((out / DATA_STATS).read_text()))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, eot_id = load_tokenizer(Path(tokenizer_dir))
    assert settings.data is not None
    data = read_instructions(settings.data)
    train, val, held = split(settings, data)
    rejected = data.rejected + (held.rejected if held else [])
    if not train or not val:
        raise ValueError(f"finetune.data {settings.data}: {len(train)} training and {len(val)} held-out examples "
                         f"after {len(rejected)} bad lines ({_reasons(rejected)}); both must be non-empty")
    fitted_train, fitted_val = _fit(tokenizer, train, seq_len, settings), _fit(tokenizer, val, seq_len, settings)
    train_rows, val_rows = pack(fitted_train.examples, seq_len, eot_id), pack(fitted_val.examples, seq_len, eot_id)
    save_rows(out / "train.npz", train_rows)
    save_rows(out / "val.npz", val_rows)
    atomic_write_bytes(out / VAL_EXAMPLES, "".join(json.dumps({"messages": m}) + "\n" for m in val).encode())
    atomic_write_bytes(out / REJECTED, "".join(json.dumps(row) + "\n" for row in rejected).encode())
    stats = {"examples_in": len(data.examples) + len(data.rejected), "bad_lines": len(rejected),
             "bad_lines_by_reason": _reasons(rejected), "train_examples": len(fitted_train.examples),
             "val_examples": len(fitted_val.examples),
             "truncated": fitted_train.truncated + fitted_val.truncated,
             "dropped_too_long": fitted_train.dropped + fitted_val.dropped,
             "train_rows": len(train_rows), "val_rows": len(val_rows), "seq_len": seq_len,
             "train_answer_tokens": int((train_rows.targets != -100).sum()),
             "packing_efficiency": round(float((train_rows.segments >= 0).mean()), 4)}
    atomic_write_json(out / DATA_STATS, stats)
    return stats


def _reasons(rejected: list[dict[str, Any]]) -> dict[str, int]:
    return InstructionSet(rejected=rejected).rejected_by_reason


def mean_answer_loss(model: torch.nn.Module, rows: PackedRows, micro: int = 8) -> float:
    """Per-answer-token cross-entropy of `model` over all rows (one process)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), micro):
            index = np.arange(start, min(start + micro, len(rows)))
            parts = (torch.from_numpy(part[index]) for part in (rows.tokens, rows.targets, rows.segments))
            loss, tokens = summed_loss(model, *parts)
            total, count = total + float(loss), count + tokens
    return total / count if count else math.nan


def answer_scores(model: Transformer, tokenizer: Any, eot_id: int, examples: list[Messages], max_new: int
                  ) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Greedy answers to each held-out prompt: exact match (after stripping) and chrF against the reference."""
    decoder = Decoder(model.eval())
    hypotheses, references, samples = [], [], []
    for messages in examples:
        prompt = render_chat(messages[:-1], EOT_TOKEN, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        room = model.config.max_seq_len - len(prompt_ids)
        output = greedy_generate(decoder, prompt_ids, min(max_new, room), eot_id) if room > 0 else []
        answer = tokenizer.decode([t for t in output if t != eot_id]).strip()
        hypotheses.append(answer)
        references.append(messages[-1]["content"].strip())
        samples.append({"prompt": messages[-2]["content"][:200], "reference": references[-1], "answer": answer})
    exact = sum(h == r for h, r in zip(hypotheses, references, strict=True)) / max(1, len(references))
    chrf = generation_scores(hypotheses, references)["chrf"] if references else math.nan
    return {"exact_match": exact, "chrf": chrf}, samples[:5]


@ray.remote(num_cpus=1, max_retries=1)
def compare_models(job: dict[str, Any], checkpoint: str, tokenizer_dir: str) -> list[dict[str, Any]]:
    """Base vs tuned on the held-out set: answer-token loss on every held-out row, and generated answers."""
    spec = FinetuneJob.model_validate(job)
    torch.set_num_threads(1)
    tokenizer, eot_id = load_tokenizer(Path(tokenizer_dir))
    rows = load_rows(Path(spec.data_dir) / "val.npz")
    examples = [json.loads(line)["messages"] for line in
                (Path(spec.data_dir) / VAL_EXAMPLES).read_text().splitlines()][: spec.config.eval_answers]
    results = []
    for name, model in (("base", base_model(spec)), ("tuned", merged_transformer(spec, Path(checkpoint)))):
        model.eval()
        scores, samples = answer_scores(model, tokenizer, eot_id, examples, spec.config.max_new_tokens)
        results.append({"model": name, "held_out_loss": mean_answer_loss(model, rows), **scores,
                        "answers_scored": len(examples), "samples": samples})
    return results


@ray.remote(num_cpus=1, max_retries=1)
def export_outputs(job: dict[str, Any], checkpoint: str, pretrain_path: str, tokenizer: str, stage_path: str
                ) -> dict[str, str]:
    """The adapter (LoRA), the base it applies to, and the merged model when asked (or for full finetuning)."""
    spec = FinetuneJob.model_validate(job)
    stage, final = Path(stage_path), Path(checkpoint)
    outputs: dict[str, str] = {}
    if spec.config.method == "lora":
        base = base_model(spec)
        pretrain_final = latest_checkpoint(Path(pretrain_path) / CHECKPOINTS_DIR)
        base_dir = Path(pretrain_path) / HF_DIR
        if pretrain_final is None or pretrain_final.name != Path(spec.base_checkpoint).name:
            base_dir = write_hf(base, Path(tokenizer), stage / BASE_DIR)  # the export is the final step's
            outputs["base"] = BASE_DIR
        export_adapter(spec, final, base_dir, weights_digest(base), stage / ADAPTER_DIR)
        outputs["adapter"] = ADAPTER_DIR
    if spec.config.merge or spec.config.method == "full":
        write_hf(merged_transformer(spec, final), Path(tokenizer), stage / MERGED_DIR)
        outputs["merged"] = MERGED_DIR
    return outputs
