"""The stage contract every forgeline stage follows.

- Output lives at `<run_dir>/<stage>-<hash>/`; the hash covers the stage's config, the hashes of its inputs
  and the stage's code version, so the same inputs and config give the same path and a rerun skips it.
- Output is Parquet shards (published atomically, see `dataprep.shards`), `manifest.json`, then `_SUCCESS`
  written last. Only a directory with `_SUCCESS` is complete.
- Work is split into units (for ingest: one per input file); a unit publishes shards as it goes and a
  `_units/<unit>.json` marker at its end. A rerun skips finished units and resumes unfinished ones after
  their last published shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import xxhash
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo

from dataprep.shards import TMP_DIR_NAME, atomic_write_bytes, atomic_write_json

CONTRACT_VERSION = 1
SUCCESS_FILE = "_SUCCESS"
MANIFEST_FILE = "manifest.json"
UNITS_DIR = "_units"
HASH_CHARS = 12  # hex characters of a stage address

# Folder names of the contract, shared by the stages that write and the ones (and the server) that read them
DATA_DIR = "data"  # document shards (ingest, dedup, filter)
QUARANTINE_DIR = "quarantine"  # records ingest set aside, with the reason
REMOVED_DIR = "removed"  # documents a stage dropped, with the reason
TOKENIZER_DIR = "tokenizer"  # tokenize: tokenizer.json and the transformers files
TOKENS_DIR = "tokens"  # tokenize: packed windows and index.json
CHECKPOINTS_DIR = "checkpoints"  # pretrain: sharded (DCP) checkpoints
HF_DIR = "hf"  # pretrain: the exported Hugging Face model


class StageConfig(BaseModel):
    """Base of every stage's config: unknown fields are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_location(value: Any, info: ValidationInfo) -> Any:
    """A relative path in a config file resolves against the file's folder (`context["base_dir"]`); URLs stay."""
    base = (info.context or {}).get("base_dir")
    if base is None or not isinstance(value, str | Path) or "://" in str(value):
        return value
    expanded = os.path.expanduser(str(value))
    return expanded if os.path.isabs(expanded) else str((Path(base) / expanded).resolve())


ConfigPath = Annotated[Path, BeforeValidator(resolve_location)]
"""A local path in a config: relative to the config file."""
ConfigLocation = Annotated[str, BeforeValidator(resolve_location)]
"""A local path (relative to the config file) or an fsspec URL."""


def package_version() -> str:
    """The installed forgeline version (part of every stage's code version)."""
    try:
        return metadata.version("forgeline")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def file_digest(path: Path) -> str:
    """xxh64 of a file's bytes, read in 1 MiB blocks: the fingerprint of a model, list or task file in a hash."""
    digest = xxhash.xxh64()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """Deterministic JSON used for hashing (sorted keys, no whitespace)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def stage_hash(stage: str, config: dict[str, Any], input_hashes: list[str], code_version: str) -> str:
    """Content address of a stage output: config + input hashes + code version."""
    material = canonical_json(
        {
            "stage": stage,
            "config": config,
            "inputs": input_hashes,
            "code": code_version,
            "contract": CONTRACT_VERSION,
        }
    )
    return hashlib.sha256(material.encode()).hexdigest()[:HASH_CHARS]


@dataclass(frozen=True)
class StageDir:
    """A stage's output directory and the files of the contract inside it."""

    path: Path

    @classmethod
    def for_stage(cls, run_dir: Path, stage: str, digest: str) -> StageDir:
        return cls(Path(run_dir) / f"{stage}-{digest}")

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def digest(self) -> str:
        return self.path.name.rsplit("-", 1)[-1]

    @property
    def tmp_dir(self) -> Path:
        return self.path / TMP_DIR_NAME

    @property
    def units_dir(self) -> Path:
        return self.path / UNITS_DIR

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    def is_complete(self) -> bool:
        return (self.path / SUCCESS_FILE).is_file()

    def prepare(self) -> None:
        """Create the directory and drop leftovers of a crashed attempt (never-published temp files)."""
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir()

    def unit_marker(self, unit: str) -> Path:
        return self.units_dir / f"{unit}.json"

    def finished_unit(self, unit: str) -> dict[str, Any] | None:
        """The stats a finished unit recorded, or None when it has not finished."""
        marker = self.unit_marker(unit)
        return json.loads(marker.read_text()) if marker.is_file() else None

    def finish_unit(self, unit: str, stats: dict[str, Any]) -> None:
        atomic_write_json(self.unit_marker(unit), stats)

    def read_manifest(self) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return manifest

    def publish(self, manifest: dict[str, Any]) -> None:
        """Write the manifest, remove temp space, then write `_SUCCESS` last."""
        atomic_write_json(self.manifest_path, manifest)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        atomic_write_bytes(self.path / SUCCESS_FILE, b"")


def shard_name(unit_index: int, shard_index: int) -> str:
    """File name of shard `shard_index` of unit `unit_index` (sorts in output order)."""
    return f"part-{unit_index:05d}-{shard_index:05d}.parquet"


def merge_counts(target: dict[str, int], source: dict[str, int]) -> dict[str, int]:
    """Add the counts of `source` into `target` (returns target)."""
    for key, value in source.items():
        target[key] = target.get(key, 0) + value
    return target


class InjectedFault(RuntimeError):
    """Raised by a `FaultPlan` (failure drills and resume tests)."""


@dataclass(frozen=True)
class FaultPlan:
    """Failure drill: fail a unit once `after` units of progress (ingest: shards; pretrain: steps) are done.

    `kill=True` ends the worker process at once (as a node loss or OOM kill would) instead of raising.
    A unit that resumes at or past the threshold is not failed again, so a retry or rerun completes.
    """

    after: int
    kill: bool = False

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """`<shards>` or `<shards>:kill`."""
        count, _, mode = spec.partition(":")
        if not count.isdigit() or int(count) < 1 or mode not in ("", "kill", "raise"):
            raise ValueError(f"fault {spec!r}: expected '<shards>' or '<shards>:kill' with shards >= 1")
        return cls(int(count), mode == "kill")

    def check(self, resumed_from: int, published: int, unit: str) -> None:
        if resumed_from < self.after <= published:
            if self.kill:
                os._exit(137)
            raise InjectedFault(f"injected fault after shard {published} of unit {unit}")
