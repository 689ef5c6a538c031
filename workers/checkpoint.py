"""Sharded training checkpoints with `torch.distributed.checkpoint` (DCP); only complete ones are visible.

A checkpoint `<root>/step-<8 digits>/` holds:
- the DCP shards of `{"model": ..., "optim": ...}` (each rank writes its own shards; `get_state_dict` /
  `set_state_dict` make them loadable at any world size),
- `rng-rank<r>.pt` per rank (torch CPU/CUDA, numpy and Python RNG states as tensors and ints; loaded with
  `weights_only=True`, never unpickling objects),
- `train_state.json` last: step, LR-scheduler state, data position, model config, world size.

Every rank writes into `<root>/.tmp-step-<n>/`; after a barrier rank 0 writes `train_state.json` and renames
the directory into place, so a crash mid-save leaves only a temp directory that the next save removes.
Right after publishing, rank 0 appends a line to `<root>/saved.jsonl` (step, path, metrics): the journal of
every checkpoint saved, kept when `keep_last` later prunes the directory, so a watcher polling now and then
announces every checkpoint, not only those still on disk when it looks.
The last `keep_last` checkpoints are kept. `root` must be shared by all ranks (a local disk on one node,
NFS or a mounted bucket on a cluster).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dataprep.shards import atomic_write_json

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "train_state.json"
JOURNAL_FILE = "saved.jsonl"


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a model of a different shape or a different run."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, as tensors and plain Python values (safe for `weights_only` loading)."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any], keep_last: int, trainable_only: bool = False) -> Path:
    """Collective: every rank calls it. Returns the published directory. `trainable_only`: leave frozen
    parameters out (a LoRA run saves its adapters and their optimizer state, not the base model)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp, final = root / f".tmp-step-{step:08d}", step_dir(root, step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        atomic_write_json(tmp / STATE_FILE, {**train_state, "step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        append_journal(root, final, {**train_state, "step": step})
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def append_journal(root: Path, checkpoint: Path, train_state: dict[str, Any]) -> None:
    """One line per saved checkpoint, appended (single writer: rank 0) and flushed to disk."""
    line = json.dumps({"step": train_state["step"], "path": str(checkpoint),
                       "metrics": train_state.get("metrics", {})}) + "\n"
    with open(root / JOURNAL_FILE, "a", encoding="utf-8") as journal:
        journal.write(line)
        journal.flush()
        os.fsync(journal.fileno())


def read_journal(root: Path) -> list[dict[str, Any]]:
    """Every checkpoint saved under `root`, in save order (a torn last line from a crash is skipped)."""
    path = root / JOURNAL_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def check_compatible(checkpoint: Path, model_config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's train state, or CheckpointMismatch naming the fields whose values differ."""
    state = read_state(checkpoint)
    saved = state.get("model", {})
    different = {k: (saved.get(k), v) for k, v in model_config.items() if saved.get(k) != v}
    if different:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(different.items()))
        raise CheckpointMismatch(f"{checkpoint} was written by a different model shape ({detail})")
    return state


def _options(trainable_only: bool) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    restore_rng: bool = True, trainable_only: bool = False) -> dict[str, Any]:
    """Collective: load model (+ optimizer) shards and this rank's RNG states; returns the train state.
    `trainable_only`: the checkpoint holds only the trainable parameters (the rest keep their values)."""
    state = read_state(checkpoint)
    rank = dist.get_rank() if dist.is_initialized() else 0
    options = _options(trainable_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options) if optimizer is not None else (
        get_state_dict(model, [], options=options)[0], None)
    target: dict[str, Any] = {"model": model_state} if optim_state is None else {"model": model_state,
                                                                                "optim": optim_state}
    dcp.load(target, checkpoint_id=str(checkpoint))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"],
                       options=options)
    else:
        set_state_dict(model, [], model_state_dict=target["model"], optim_state_dict={}, options=options)
    rng_file = checkpoint / f"rng-rank{rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def load_full_model(checkpoint: Path, model: ModuleT, trainable_only: bool = False) -> ModuleT:
    """Load a checkpoint's weights into an unsharded model in one process (no process group needed).
    `trainable_only`: the checkpoint holds only the parameters that require grad (a LoRA run's adapters)."""
    weights = {name: param for name, param in model.named_parameters() if param.requires_grad} \
        if trainable_only else model.state_dict()
    state = {"model": {name: tensor.detach().clone() for name, tensor in weights.items()}}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    missing, unexpected = model.load_state_dict(state["model"], strict=not trainable_only)
    if unexpected:
        raise CheckpointMismatch(f"{checkpoint}: unexpected parameters {unexpected[:5]}")
    return model
