"""Perplexity, continuation log-probabilities and greedy decoding checked against independent computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dataprep.tokenize.packing import SplitPacker, TokenWindows, write_index
from dataprep.tokenize.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from workers.decoder import Decoder
from workers.evaluate import continuation_logprob, greedy_generate, perplexity, token_byte_lengths
from workers.model import Transformer
from workers.model_config import ModelConfig

CONFIG = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


@pytest.fixture(scope="module")
def model() -> Transformer:
    model = Transformer(CONFIG).eval()
    model.init_weights(7)
    with torch.no_grad():  # larger weights: sharper distributions make the checks meaningful
        for param in model.parameters():
            param.mul_(5.0)
    return model


def test_perplexity_is_exp_of_mean_nll(model: Transformer, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    packer = SplitPacker(tmp_path, "val", 8, np.dtype(np.uint16), windows_per_shard=100)
    packer.add(rng.integers(0, 50, size=5 * 9).astype(np.uint16))
    write_index(tmp_path, {"seq_len": 8, "vocab_size": 50, "splits": {"val": packer.finish()}})
    windows = TokenWindows(tmp_path, "val")
    byte_lengths = np.arange(50) % 3 + 1
    got = perplexity(Decoder(model), windows, byte_lengths, max_windows=5, batch=2)
    nll, count, size = 0.0, 0, 0
    for window in windows:  # independently: one window at a time, explicit log-softmax and indexing
        tokens = torch.tensor(np.asarray(window, dtype=np.int64))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(tokens[None, :-1])[0].double(), dim=-1)
        for position, target in enumerate(tokens[1:].tolist()):
            nll -= float(logprobs[position, target])
            count += 1
            size += int(byte_lengths[target])
    assert got["tokens"] == count == 40
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / size, rel=1e-5)


def test_continuation_logprob_and_greedy_match_recomputation(model: Transformer) -> None:
    prompt, continuation = [1, 5, 9, 2], [7, 3]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + continuation]))[0], dim=-1)
    expected = float(logprobs[3, 7] + logprobs[4, 3])
    decoder = Decoder(model)
    assert continuation_logprob(decoder, prompt, continuation) == pytest.approx(expected, abs=1e-5)
    generated = greedy_generate(decoder, prompt, 10, stop_id=None)
    sequence = list(prompt)
    for _ in range(10):  # recompute the whole sequence at every step, take the argmax
        with torch.no_grad():
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert generated == sequence[len(prompt):]


def test_token_byte_lengths_add_up_to_utf8_bytes(tmp_path: Path) -> None:
    save_tokenizer(train_bpe(["naïve café costs 5 €; the cat sat"] * 30, 300), tmp_path)
    tokenizer, eot_id = load_tokenizer(tmp_path)
    lengths = token_byte_lengths(tokenizer)
    text = "naïve café: the cat sat — 中文"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert int(lengths[ids].sum()) == len(text.encode()) and lengths[eot_id] == 0
