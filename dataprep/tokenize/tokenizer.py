"""Byte-level BPE tokenizer (the `tokenizers` library): train on the curated corpus, save, load and check.

The saved directory holds `tokenizer.json` plus `tokenizer_config.json` (with the chat template of
`dataprep.finetune.chat`) and `special_tokens_map.json`, so
`transformers.PreTrainedTokenizerFast.from_pretrained(dir)` (and `AutoTokenizer`) load it. The end-of-text
token separates documents in packed windows.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dataprep.finetune.chat import CHAT_TEMPLATE
from dataprep.shards import atomic_write_bytes, atomic_write_json
from dataprep.stage import ConfigPath, StageConfig

EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class TokenizeConfig(StageConfig):
    """The tokenize stage: train (or load) a byte-level BPE, pack fixed windows with end-of-text separators."""

    tokenizer: ConfigPath | None = Field(None, description="an existing tokenizer.json (or its folder); null = train")
    vocab_size: int = Field(8192, ge=257, le=2**31, description="BPE vocabulary incl. 256 bytes + end-of-text")
    min_frequency: int = Field(2, ge=1)
    eot_token: str = Field("<|endoftext|>", min_length=1)
    seq_len: int = Field(256, ge=2, description="tokens per training window (windows hold seq_len + 1)")
    holdout: float = Field(0.02, gt=0.0, lt=0.5, description="fraction of documents held out (by doc id hash)")
    windows_per_shard: int = Field(4096, ge=1)


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or lacks the end-of-text token."""


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, eot_token: str = EOT_TOKEN) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE (256 byte symbols + merges + the end-of-text token)."""
    if vocab_size < 257:
        raise TokenizerError(f"vocab_size {vocab_size}: a byte-level BPE needs at least 257 (256 bytes + end-of-text)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[eot_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path, eot_token: str = EOT_TOKEN, max_length: int = 2048) -> Path:
    """Write tokenizer.json and the two small files transformers reads; returns the tokenizer.json path."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / TOKENIZER_FILE, tokenizer.to_str().encode())
    specials = {"bos_token": eot_token, "eos_token": eot_token, "unk_token": eot_token}
    atomic_write_json(directory / "special_tokens_map.json", specials)
    atomic_write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **specials,
        "chat_template": CHAT_TEMPLATE,
    })
    return directory / TOKENIZER_FILE


def load_tokenizer(path: Path, eot_token: str = EOT_TOKEN) -> tuple[Tokenizer, int]:
    """A `tokenizer.json` (or a directory holding one) and the id of its end-of-text token."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"tokenizer not found: {file}")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # the Rust side raises plain Exception on bad JSON
        raise TokenizerError(f"{file}: not a tokenizers JSON file ({error})") from None
    eot_id = tokenizer.token_to_id(eot_token)
    if eot_id is None:
        raise TokenizerError(f"{file}: has no end-of-text token {eot_token!r}; set tokenize.eot_token")
    return tokenizer, eot_id


def copy_hf_files(source: Path, directory: Path, eot_token: str = EOT_TOKEN, max_length: int = 2048) -> Path:
    """Copy an existing tokenizer.json into `directory` with the transformers side files."""
    tokenizer, _ = load_tokenizer(source, eot_token)
    return save_tokenizer(tokenizer, directory, eot_token, max_length)
