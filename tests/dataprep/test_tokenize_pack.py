"""Tokenizer training/loading and packing invariants: end-of-text between documents, window length, counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataprep.tokenize.packing import (
    SplitPacker,
    TokenWindows,
    held_out,
    join_documents,
    token_dtype,
    unigram_loss,
    write_index,
)
from dataprep.tokenize.tokenizer import EOT_TOKEN, TokenizerError, load_tokenizer, save_tokenizer, train_bpe
from tests.conftest import reference_documents


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    texts = [text for _, text in reference_documents(60)]
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_bpe(texts, 600), directory)
    return directory, texts


def test_bpe_round_trips_text_and_loads_in_transformers(trained: tuple[Path, list[str]]) -> None:
    directory, texts = trained
    tokenizer, eot_id = load_tokenizer(directory)
    assert tokenizer.get_vocab_size() == 600 and tokenizer.id_to_token(eot_id) == EOT_TOKEN
    sample = texts[0][:500] + " naïve café — 中文"
    ids = tokenizer.encode(sample, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == sample  # byte-level: any text round-trips
    assert len(ids) < len(sample.encode()) * 0.7  # merges were learned
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    assert hf.encode(sample) == ids and hf.eos_token == EOT_TOKEN


def test_missing_or_eotless_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON"):
        load_tokenizer(bad)
    save_tokenizer(train_bpe(["a b c d"] * 5, 300, eot_token="<eos>"), tmp_path / "other", eot_token="<eos>")
    with pytest.raises(TokenizerError, match="end-of-text"):
        load_tokenizer(tmp_path / "other")


def test_packing_invariants(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    eot, seq_len = 0, 16
    docs = [list(rng.integers(1, 500, size=int(n))) for n in rng.integers(1, 60, size=50)]
    stream = join_documents(docs, eot, token_dtype(500))
    # one end-of-text after every document, nowhere else
    assert (stream == eot).sum() == len(docs) and stream[-1] == eot
    assert np.array_equal(np.flatnonzero(stream == eot), np.cumsum([len(d) + 1 for d in docs]) - 1)
    packer = SplitPacker(tmp_path, "train", seq_len, token_dtype(500), windows_per_shard=7)
    for piece in np.array_split(stream, 5):  # streams arrive in several pieces (one per input shard)
        packer.add(piece)
    part = packer.finish()
    total = sum(len(d) for d in docs) + len(docs)
    assert part["stream_tokens"] == total == part["windows"] * (seq_len + 1) + part["tail_tokens"]
    assert part["tail_tokens"] < seq_len + 1
    assert [s["windows"] for s in part["shards"]][:-1] == [7] * (len(part["shards"]) - 1)
    write_index(tmp_path, {"seq_len": seq_len, "vocab_size": 500, "splits": {"train": part}})
    windows = TokenWindows(tmp_path, "train")
    assert len(windows) == part["windows"]
    assert all(len(w) == seq_len + 1 for w in windows)
    # windows are the stream, in order, without gaps or overlap
    assert np.array_equal(np.concatenate(list(windows)), stream[: part["packed_tokens"]])
    assert np.array_equal(windows.batch([3, 0])[1], stream[: seq_len + 1])


def test_holdout_is_stable_and_near_the_fraction() -> None:
    ids = [f"doc-{i}" for i in range(20_000)]
    chosen = [held_out(i, 0.05) for i in ids]
    assert chosen == [held_out(i, 0.05) for i in ids]
    assert 0.045 < sum(chosen) / len(ids) < 0.055


def test_unigram_loss_of_uniform_tokens_is_log_vocab() -> None:
    counts = np.full(8, 1000)
    assert unigram_loss(counts, np.arange(8)) == pytest.approx(np.log(8))
