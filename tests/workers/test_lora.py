"""LoRA adapters at inference: the decoder's fused multi-adapter path against peft and transformers, mixed
batches in the engine, prefix-cache separation, and the refusals (another base model, shapes that do not fit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dataprep.tokenize.tokenizer import save_tokenizer, train_bpe
from serving.engine import Engine
from serving.sampling import SamplingParams
from tests.adapters import make_adapter
from workers.decoder import Decoder
from workers.export import weights_digest, write_hf
from workers.lora import AdapterError, LoraWeights
from workers.model import Transformer
from workers.model_config import ModelConfig

CONFIG = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)
TEXT = "the cat sat on the mat. a dog ran in the park. the sun is hot and the sky is blue."


@pytest.fixture(scope="module")
def base() -> Transformer:
    model = Transformer(CONFIG)
    model.init_weights(3)
    return model.eval()


@pytest.fixture(scope="module")
def served(base: Transformer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    save_tokenizer(train_bpe([TEXT] * 20, 300), root / "tok")
    hf = write_hf(base, root / "tok", root / "hf")
    first, _ = make_adapter(base, root / "first", seed=1)
    second, _ = make_adapter(base, root / "second", seed=2, targets=("q_proj", "v_proj"))
    return {"hf": hf, "first": first, "second": second, "root": root}


def test_decoder_adapter_logits_equal_peft_and_transformers(base: Transformer, served: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, reference = make_adapter(base, served["root"] / "again", seed=1)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    adapter = LoraWeights.load("first", served["first"], CONFIG)
    decoder = Decoder(_copy(base))  # the decoder re-lays the weights out: give it its own copy
    ours = decoder(tokens, decoder.new_cache(2, 17), adapter)
    with torch.no_grad():
        expected = reference(tokens)
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(served["hf"]), dtype=torch.float32),
                                       str(served["first"])).eval()
        hf_logits = hf(tokens).logits
        plain = base(tokens)
    assert (ours - plain).abs().max() > 0.1, "the adapter changes the logits"
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf_logits, expected, atol=1e-4, rtol=1e-4)


def _copy(model: Transformer) -> Transformer:
    clone = Transformer(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def test_a_batch_mixes_base_and_adapters(served: dict[str, Path]) -> None:
    engine = Engine.load(served["hf"], name="base", max_batch=8, prefix_cache_mb=16)
    engine.add_adapter("first", served["first"])
    engine.add_adapter("second", served["second"])
    prompt = engine.encode(TEXT * 2)
    blocks = (len(prompt) - 1) // 16
    assert blocks >= 1

    def params(adapter: str | None) -> SamplingParams:
        return SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, adapter=adapter)

    choices = (None, "first", "second", None, "first")
    alone = {name: engine.generate(prompt, params(name)).output_ids for name in (None, "first", "second")}
    assert len({tuple(ids) for ids in alone.values()}) == 3, "each adapter answers differently"
    cached_before = engine.stats["cached_tokens"]
    together = [engine.submit(prompt, params(name)) for name in choices]
    engine.run_until_idle()
    assert [r.output_ids for r in together] == [alone[name] for name in choices]
    # every request finds the blocks its own model stored when it ran alone (chains are per adapter: a shared
    # chain would have given the second and third models the base's keys, and other tokens than alone)
    assert engine.stats["cached_tokens"] - cached_before == 16 * blocks * len(choices)
    assert engine.prefix_cache is not None and engine.prefix_cache.stats.stored_blocks == 3 * (len(prompt) // 16)


def test_adapter_of_another_base_or_shape_is_refused(base: Transformer, served: dict[str, Path],
                                                     tmp_path: Path) -> None:
    engine = Engine.load(served["hf"], name="base")
    foreign = shutil.copytree(served["first"], tmp_path / "foreign")
    (foreign / "forgeline_adapter.json").write_text(json.dumps({"base_weights_digest": "0123456789abcdef"}))
    with pytest.raises(AdapterError, match="trained on another base model"):
        engine.add_adapter("foreign", foreign)
    wider = Transformer(ModelConfig(**{**CONFIG.to_dict(), "ffn_dim": 96}))
    wider.init_weights(0)
    other_shape, _ = make_adapter(wider, tmp_path / "other-shape", targets=("gate_proj",))
    (other_shape / "forgeline_adapter.json").unlink()
    with pytest.raises(AdapterError, match="does not fit"):
        engine.add_adapter("other", other_shape)
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        engine.add_adapter("missing", tmp_path)
    with pytest.raises(AdapterError, match="must differ"):
        engine.add_adapter("base", served["first"])
    assert engine.base_digest == weights_digest(base) and engine.adapters == {}
