"""The finetune stage on real Ray Train (2 workers, FSDP2 over gloo) and a real Prefect server, from the session's
pretrained tiny model: bad lines counted, LoRA trains only adapters, the tuned model beats the base on held-out
answers, the PEFT adapter loads in transformers with equal logits, a killed worker resumes exactly, reruns skip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dataprep.evaluate.curves import read_metrics
from dataprep.finetune.sample import instruction_rows
from flows.config import RunConfig, parse_config
from tests.conftest import reference_documents
from workers.checkpoint import complete_checkpoints, read_state

pytestmark = pytest.mark.integration
COMPARED = ("loss", "grad_norm", "lr", "val_loss")
GOOD_LINES = 120


def write_instructions(path: Path) -> Path:
    rows = [json.dumps(row) for row in instruction_rows([text for _, text in reference_documents(40)], GOOD_LINES)]
    overlong = json.dumps({"prompt": "Summarise: " + "word " * 300, "completion": "short"})  # no answer fits
    bad = ["{broken", '{"prompt": "no completion"}', "not json either"]
    path.write_text("\n".join(rows[:50] + bad[:2] + rows[50:] + [overlong, bad[2]]) + "\n")
    return path


def finetune_config(pretrained: dict[str, Any], run_dir: Path, data: Path) -> RunConfig:
    base = pretrained["config"].model_dump(mode="json")
    return parse_config({**base, "run_dir": str(run_dir), "finetune": {
        "data": str(data), "steps": 12, "micro_batch": 4, "lr": 5e-3, "warmup_steps": 2, "checkpoint_every": 4,
        "keep_last": 2, "num_workers": 2, "max_failures": 1, "eval_answers": 8, "max_new_tokens": 6,
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}})


@pytest.fixture(scope="module")
def tuned(pretrained_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from flows.finetune import finetune_flow

    data = write_instructions(tmp_path_factory.mktemp("instructions") / "train.jsonl")
    config = finetune_config(pretrained_run, Path(pretrained_run["config"].run_dir), data)
    return {"config": config, "data": data, "result": finetune_flow(config, pretrained_run["trained"]["path"])}


def test_bad_lines_are_counted_and_set_aside(tuned: dict[str, Any]) -> None:
    stats, stage = tuned["result"]["stats"], Path(tuned["result"]["path"])
    assert stats["bad_lines_by_reason"] == {"invalid_json": 2, "missing_field": 1}
    assert stats["examples_in"] == GOOD_LINES + 1 + 3 and stats["dropped_too_long"] == 1
    assert stats["train_examples"] + stats["val_examples"] == GOOD_LINES and stats["val_examples"] > 0
    rejected = [json.loads(line) for line in (stage / "_data" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [(51, "invalid_json"), (52, "missing_field"),
                                                           (GOOD_LINES + 4, "invalid_json")]


def test_lora_trains_adapters_only_and_beats_the_base(tuned: dict[str, Any]) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    stats, stage = tuned["result"]["stats"], Path(tuned["result"]["path"])
    assert 0 < stats["trainable_fraction"] < 0.2 and stats["method"] == "lora"
    assert stats["comparison"]["tuned"]["held_out_loss"] < stats["comparison"]["base"]["held_out_loss"]
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == list(range(1, 13))
    final = complete_checkpoints(stage / "checkpoints")[-1]
    saved = FileSystemReader(str(final)).read_metadata().state_dict_metadata
    model_keys = [key for key in saved if key.startswith("model.")]
    assert model_keys and all(".lora_A." in key or ".lora_B." in key for key in model_keys), "only adapters saved"
    assert {p.name for p in stage.glob("*.png")} == {"loss.png", "comparison.png"}


def test_adapter_loads_in_peft_with_our_logits(tuned: dict[str, Any], pretrained_run: dict[str, Any]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workers.finetune import merged_transformer
    from workers.finetune_config import FinetuneJob

    stage = Path(tuned["result"]["path"])
    adapter_config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    base_dir = Path(pretrained_run["trained"]["path"]) / "hf"
    assert adapter_config["base_model_name_or_path"] == str(base_dir) and adapter_config["task_type"] == "CAUSAL_LM"
    final = complete_checkpoints(stage / "checkpoints")[-1]
    ours = merged_transformer(FinetuneJob.model_validate(read_state(final)["spec"]), final)
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                   str(stage / "adapter")).eval()
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)


def test_killed_worker_resumes_with_the_same_losses(tuned: dict[str, Any], pretrained_run: dict[str, Any],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.finetune import finetune_flow

    config = finetune_config(pretrained_run, tmp_path / "run", tuned["data"])
    monkeypatch.setenv("FORGELINE_INJECT_FAULT", "finetune:6")  # rank 1 SIGKILLs itself after step 6
    result = finetune_flow(config, pretrained_run["trained"]["path"])
    stage = Path(result["path"])
    assert (stage / ".fault-step-6").is_file(), "the worker was killed"
    assert result["stats"]["resumed_from_steps"] == [4] and tuned["result"]["stats"]["resumed_from_steps"] == []
    expected = read_metrics(Path(tuned["result"]["path"]) / "metrics.jsonl")
    resumed = read_metrics(stage / "metrics.jsonl")
    assert [[r.get(k) for k in COMPARED] for r in resumed] == [[r.get(k) for k in COMPARED] for r in expected]


def test_rerun_skips_and_bad_config_fails_first(tuned: dict[str, Any], pretrained_run: dict[str, Any],
                                               tmp_path: Path) -> None:
    from flows.finetune import finetune_flow

    again = finetune_flow(tuned["config"], pretrained_run["trained"]["path"])
    assert again["skipped"] and again["path"] == tuned["result"]["path"]
    base = tuned["config"].model_dump(mode="json")
    missing = parse_config({**base, "run_dir": str(tmp_path / "a"),
                            "finetune": {**base["finetune"], "data": str(tmp_path / "none.jsonl")}})
    with pytest.raises(ValueError, match="finetune.data: no such file"):
        finetune_flow(missing, pretrained_run["trained"]["path"])
    no_step = parse_config({**base, "run_dir": str(tmp_path / "b"), "finetune": {**base["finetune"], "checkpoint": 5}})
    with pytest.raises(ValueError, match="finetune.checkpoint 5: no such complete checkpoint"):
        finetune_flow(no_step, pretrained_run["trained"]["path"])
    too_long = parse_config({**base, "run_dir": str(tmp_path / "c"), "finetune": {**base["finetune"], "seq_len": 256}})
    with pytest.raises(ValueError, match="finetune.seq_len 256 is larger than the model's context 128"):
        finetune_flow(too_long, pretrained_run["trained"]["path"])
    assert not any((tmp_path / name).exists() for name in "abc"), "nothing was written"
