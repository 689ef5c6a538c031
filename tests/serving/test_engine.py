"""The engine against recomputation: KV-cached logits, greedy, beam width 1, top-k 1, seeds, continuous batching."""

from __future__ import annotations

import threading

import pytest
import torch

from dataprep.tokenize.tokenizer import EOT_TOKEN, train_bpe
from serving.engine import Engine
from serving.kv_cache import BatchKVCache
from serving.sampling import RequestError, SamplingParams, safe_prefix
from workers.decoder import ONEDNN_LINEAR, Decoder, attention, linear, prepack
from workers.model import KVCache, Transformer
from workers.model_config import ModelConfig

CONFIG = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
TEXT = "the cat sat on the mat. a dog ran in the park. the sun is hot and the sky is blue."


@pytest.fixture(scope="module")
def engine() -> Engine:
    tokenizer = train_bpe([TEXT] * 20, 300)
    model = Transformer(CONFIG)
    model.init_weights(11)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0)  # peaky distributions: sampling and greedy differ visibly
    return Engine(model, tokenizer, tokenizer.token_to_id(EOT_TOKEN), max_batch=4)


def fused_and_reference(seed: int) -> tuple[Transformer, Transformer, Decoder]:
    """A model, an unfused copy to recompute with, and the model's fused decoder (sharing its weights)."""
    model = Transformer(CONFIG).eval()
    model.init_weights(seed)
    reference = Transformer(CONFIG).eval()
    reference.load_state_dict(model.state_dict())
    return model, reference, Decoder(model)


def recompute_greedy(engine: Engine, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    sequence, logits_seen = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = engine.model(torch.tensor([sequence]))[0, -1]
        logits_seen.append(logits)
        sequence.append(int(logits.argmax()))
    return sequence[len(prompt):], logits_seen


@pytest.mark.parametrize("prompts", [[[5, 9, 13, 200], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9]],  # different lengths
                                     [[5, 9, 13], [7, 8, 9]]])  # equal lengths: no mask needed
@pytest.mark.parametrize("forward", ["module", "fused"])
def test_batch_cache_logits_equal_full_recomputation_at_every_step(forward: str, prompts: list[list[int]]) -> None:
    model, reference, fused = fused_and_reference(11)

    def step(tokens: torch.Tensor, cache: KVCache | BatchKVCache) -> torch.Tensor:
        return model(tokens, cache=cache) if forward == "module" else fused(tokens, cache)

    cache = BatchKVCache(CONFIG, 64, torch.device("cpu"), torch.float32)
    sequences = [list(p) for p in prompts]
    for prompt, sequence in zip(prompts, sequences, strict=True):
        single = KVCache(CONFIG, 1, len(prompt), torch.device("cpu"), torch.float32)
        with torch.no_grad():
            sequence.append(int(step(torch.tensor([prompt]), single)[0, -1].argmax()))
        cache.add_rows(single, [single.length])
    for _ in range(12):
        with torch.no_grad():
            cached = step(torch.tensor([[s[-1]] for s in sequences]), cache)[:, -1]
        for row, sequence in enumerate(sequences):
            with torch.no_grad():
                full = reference(torch.tensor([sequence]))[0, -1]
            assert torch.allclose(cached[row], full, atol=1e-5)
            sequence.append(int(full.argmax()))


def test_fused_decoder_single_row_and_shared_weights() -> None:
    model, reference, fused = fused_and_reference(3)
    layer = fused.layers[0]
    assert model.model.layers[0].self_attn.k_proj.weight.data_ptr() == layer.qkv[CONFIG.dim:].data_ptr()
    sequence, cache = [4, 8, 15, 16], KVCache(CONFIG, 1, 40, torch.device("cpu"), torch.float32)
    logits = fused(torch.tensor([sequence]), cache)[0]
    with torch.no_grad():
        assert torch.allclose(logits, reference(torch.tensor([sequence]))[0], atol=1e-5)  # causal prefill
        for _ in range(20):  # batch-1 decode, no mask
            sequence.append(int(logits[-1].argmax()))
            logits = fused(torch.tensor([sequence[-1:]]), cache)[0]
            assert torch.allclose(logits[-1], reference(torch.tensor([sequence]))[0, -1], atol=1e-5)
            assert torch.allclose(logits[-1], model(torch.tensor([sequence]))[0, -1], atol=1e-5)


def test_mixed_step_decodes_and_prefills_in_one_pass() -> None:
    _, reference, fused = fused_and_reference(5)
    cache = BatchKVCache(CONFIG, 64, torch.device("cpu"), torch.float32, max_rows=4)
    running = [[3, 1, 4, 1, 5], [9, 2]]  # different lengths: the masked path
    _, _, caches = fused.mixed_step([], cache, running, [False, False])
    for sequence, own in zip(running, caches, strict=True):
        cache.add_rows(own, [len(sequence)])
    prompts = [[7, 7, 8], [2, 6, 5, 3, 5, 8, 9]]
    logits, prompt_logits, _ = fused.mixed_step([6, 4], cache, prompts, [True, False])
    with torch.no_grad():
        for row, sequence in enumerate(running):
            expected = reference(torch.tensor([sequence + [[6, 4][row]]]))[0, -1]
            assert torch.allclose(logits[row], expected, atol=1e-5)
        assert torch.allclose(prompt_logits[0], reference(torch.tensor([prompts[0]]))[0], atol=1e-5)  # every position
        assert prompt_logits[1].shape[0] == 1
        assert torch.allclose(prompt_logits[1][0], reference(torch.tensor([prompts[1]]))[0, -1], atol=1e-5)
    assert cache.lengths.tolist() == [6, 3]


def test_keep_rows_moves_the_last_rows_into_the_holes() -> None:
    cache = BatchKVCache(CONFIG, 16, torch.device("cpu"), torch.float32, max_rows=6)
    prefilled = KVCache(CONFIG, 6, 16, torch.device("cpu"), torch.float32)
    for store in (prefilled.keys, prefilled.values):
        for layer in store:
            layer.normal_()
    lengths = [3, 5, 2, 7, 4, 6]
    cache.add_rows(prefilled, lengths)
    order = cache.keep_rows([0, 2, 4, 5])  # rows 1 and 3 leave
    assert sorted(order) == [0, 2, 4, 5] and order[0] == 0 and order[2] == 2  # rows in place stay
    assert cache.lengths.tolist() == [lengths[old] for old in order]
    for new, old in enumerate(order):
        span = lengths[old]
        for layer in range(CONFIG.n_layers):
            assert torch.equal(cache.keys[layer][new, :, :span], prefilled.keys[layer][old, :, :span])
            assert torch.equal(cache.values[layer][new, :, :span], prefilled.values[layer][old, :, :span])


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (4, 64), (16, 64), (2, 9, 64)])
@pytest.mark.parametrize("outputs", [96, 2**20 // 64])
def test_linear_paths_equal_f_linear(shape: tuple[int, ...], outputs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """F.linear (small weights), oneDNN (2^20 elements or more, any leading shape), a prepacked weight (from
    PACKED_MIN_ROWS rows) and the fallback without the private oneDNN op: one result."""
    assert ONEDNN_LINEAR is not None, "this CPU build of torch has the oneDNN linear op"
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(*shape, generator=generator), torch.randn(outputs, 64, generator=generator)
    expected = torch.nn.functional.linear(x, weight)
    assert torch.allclose(linear(x, weight), expected, atol=1e-5)
    assert torch.allclose(linear(x, weight, onednn=None), expected, atol=1e-5)
    monkeypatch.setattr("workers.decoder.PACK_MIN_WEIGHT", 0)  # the test's weights are small
    packed = prepack(weight)
    assert packed is not None and packed.is_mkldnn
    assert torch.allclose(linear(x, weight, packed=packed), expected, atol=1e-5)


def test_prepacked_decoder_equals_recomputation_and_uses_the_packed_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Decoder(model, prepacked=True)` (the engine's): a oneDNN twin of every linear weight (of PACK_MIN_WEIGHT
    elements or more: none of the test model's are, so the threshold is lowered), used by steps of 5 and 2 rows, by
    a step of 1 row on 2 threads but not on one; logits equal full recomputation at every step, as the unpacked
    decoder's."""
    model, reference, _ = fused_and_reference(13)
    threads_before = torch.get_num_threads()
    assert Decoder(model, prepacked=True).lm_head_packed is None  # 19 K elements < PACK_MIN_WEIGHT
    monkeypatch.setattr("workers.decoder.PACK_MIN_WEIGHT", 0)
    packed = Decoder(model, prepacked=True)
    assert all(set(layer.packed) == {"qkv", "o", "gate_up", "down"} for layer in packed.layers)
    assert packed.lm_head_packed is not None
    calls: list[int] = []
    original = ONEDNN_LINEAR

    def counting(x: torch.Tensor, weight: torch.Tensor, *rest: object) -> torch.Tensor:
        calls.append(int(weight.is_mkldnn))
        return original(x, weight, *rest)

    prompts = [[5, 9, 13, 200], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41], [99, 98, 97]]
    cache = BatchKVCache(CONFIG, 64, torch.device("cpu"), torch.float32, max_rows=8)
    _, first, caches = packed.mixed_step([], cache, prompts, [False] * 5)
    sequences = [p + [int(logits[-1].argmax())] for p, logits in zip(prompts, first, strict=True)]
    for own, prompt in zip(caches, prompts, strict=True):
        cache.add_rows(own, [len(prompt)])
    import workers.decoder as decoder_module

    decoder_module.ONEDNN_LINEAR = counting
    try:
        for _ in range(6):
            logits, _, _ = packed.mixed_step([s[-1] for s in sequences], cache, [], [])
            assert logits is not None
            for row, sequence in enumerate(sequences):
                with torch.no_grad():
                    full = reference(torch.tensor([sequence]))[0, -1]
                assert torch.allclose(logits[row], full, atol=1e-5)
                sequence.append(int(full.argmax()))
        assert calls and all(calls)  # every product of the 5-row steps read a packed weight
        calls.clear()
        for threads, expected in ((1, False), (2, True)):  # one row: the packed weights only on 2 threads
            torch.set_num_threads(threads)
            single = KVCache(CONFIG, 1, 8, torch.device("cpu"), torch.float32)
            one_row = packed(torch.tensor([[3]]), single)
            assert len(calls) == (9 if expected else 0) and all(calls), (threads, calls)  # 2 layers x 4 + head
            assert torch.allclose(one_row[0, -1], reference(torch.tensor([[3]]))[0, -1], atol=1e-5)
            calls.clear()
        pair = KVCache(CONFIG, 2, 8, torch.device("cpu"), torch.float32)
        torch.set_num_threads(1)
        packed(torch.tensor([[3], [4]]), pair)
        assert calls and all(calls)  # from PACKED_MIN_ROWS (2) rows on one thread
    finally:
        decoder_module.ONEDNN_LINEAR = original
        torch.set_num_threads(threads_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    keys_buffer = torch.randn(5, 2, 64, 16, generator=generator)  # a cache slice: strided like the engine's
    q, k, v = torch.randn(5, 6, 1, 16, generator=generator), keys_buffer[:, :, :40], keys_buffer[:, :, 20:60]
    mask = torch.arange(40)[None, None, None, :] < torch.tensor([40, 3, 17, 1, 33])[:, None, None, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, False).float()
    assert torch.allclose(got, expected, atol=1e-6 if dtype == torch.float32 else 3e-2)
    unmasked = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.allclose(attention(q, k, v, None, False), unmasked, atol=1e-6)


def test_greedy_beam1_and_topk1_equal_recomputed_argmax(engine: Engine) -> None:
    prompt = engine.encode("the cat sat")
    expected, _ = recompute_greedy(engine, prompt, 20)
    greedy = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert greedy.output_ids == expected
    beam = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0, beam_width=1, ignore_eos=True))
    assert beam.output_ids == expected
    top1 = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, top_k=1, ignore_eos=True, seed=5))
    assert top1.output_ids == expected


def test_seed_reproduces_and_differs_from_other_seeds(engine: Engine) -> None:
    prompt = engine.encode("a dog")
    params = dict(max_tokens=30, temperature=1.5, top_p=0.95, ignore_eos=True)
    first = engine.generate(prompt, SamplingParams(seed=1, **params)).output_ids
    assert engine.generate(prompt, SamplingParams(seed=1, **params)).output_ids == first
    assert any(engine.generate(prompt, SamplingParams(seed=s, **params)).output_ids != first for s in (2, 3, 4))


def test_beam_search_scores_at_least_greedy(engine: Engine) -> None:
    prompt = engine.encode("the sun")
    greedy = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True))
    beam = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0, beam_width=4, length_penalty=1.0,
                                                  early_stopping=False))
    greedy_score = sum(t.logprob for t in greedy.logprobs) / len(greedy.output_ids)
    assert beam.extra["beam_score"] >= greedy_score - 1e-6


def test_beam_search_does_not_stall_the_batch(engine: Engine) -> None:
    """A long beam search runs beside the batch: a short greedy request submitted after it finishes first."""
    served = Engine(engine.model, engine.tokenizer, engine.eot_id, max_batch=4)
    served.start()
    beam = served.submit(served.encode("the sun"), SamplingParams(max_tokens=100, temperature=0, beam_width=4,
                                                                  early_stopping=False))
    greedy = served.submit(served.encode("a dog"), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert greedy.done.wait(60) and len(greedy.output_ids) == 3
    assert not beam.done.is_set(), "the greedy request waited for the beam search"
    assert beam.done.wait(120) and beam.finish_reason in ("length", "stop")


def test_continuous_batching_joins_and_leaves_at_step_boundaries(engine: Engine) -> None:
    prompts = [engine.encode(t) for t in ("the cat", "a dog ran", "the sky", "blue", "the park is", "hot")]
    lengths = [5, 17, 9, 23, 3, 12]
    single = [engine.generate(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)).output_ids
              for p, n in zip(prompts, lengths, strict=True)]
    early = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
             for p, n in zip(prompts[:3], lengths[:3], strict=True)]
    for _ in range(4):
        engine.step()  # the first three are running; the rest join while they decode
    late = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for p, n in zip(prompts[3:], lengths[3:], strict=True)]
    engine.run_until_idle()
    assert [r.output_ids for r in early + late] == single
    assert [r.finish_reason for r in early + late] == ["length"] * 6


def test_abort_frees_the_row_at_the_next_step(engine: Engine) -> None:
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    prompts = [engine.encode(t) for t in ("the cat", "a dog ran", "the sky")]
    alone = engine.generate(prompts[0], params).output_ids
    before = engine.stats["aborted"]
    first, dropped, last = (engine.submit(p, params) for p in prompts)
    engine.step()
    engine.step()
    engine.abort(dropped)
    engine.step()
    assert dropped.finish_reason == "abort" and dropped.done.is_set() and dropped not in engine.running
    assert len(dropped.output_ids) == 2 and len(engine.running) == 2
    never_ran = engine.submit(prompts[1], params)
    engine.abort(never_ran)
    engine.run_until_idle()
    assert never_ran.finish_reason == "abort" and never_ran.output_ids == []
    assert first.output_ids == alone and len(last.output_ids) == 30, "the other rows are unaffected"
    assert engine.stats["aborted"] == before + 2
    engine.abort(first)  # after it finished: nothing happens
    assert first.finish_reason == "length" and engine.stats["aborted"] == before + 2


def test_stops_echo_and_logprobs(engine: Engine) -> None:
    prompt = engine.encode("the cat sat on")
    free = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    stop_text = free.text[5:8]
    stopped = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=(stop_text,),
                                                     ignore_eos=True))
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(stop_text)]
    by_id = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(free.output_ids[3],),
                                                   ignore_eos=True))
    assert by_id.output_ids == free.output_ids[:3] and by_id.finish_reason == "stop"
    echoed = engine.generate(prompt, SamplingParams(max_tokens=3, temperature=0, echo=True, logprobs=2))
    assert echoed.prompt_logprobs[0] is None and len(echoed.prompt_logprobs) == len(prompt)
    assert all(len(t.top) == 2 and t.top[0][2] >= t.logprob - 1e-6 for t in echoed.logprobs)


def test_batched_prefill_gives_each_prompt_its_own_logprobs(engine: Engine) -> None:
    params = SamplingParams(max_tokens=4, temperature=0, echo=True, logprobs=1, ignore_eos=True)
    prompts = [engine.encode(t) for t in ("the cat sat on the mat", "a dog", "the sky is blue and")]
    alone = [engine.generate(p, params) for p in prompts]
    together = [engine.submit(p, params) for p in prompts]  # prefilled in one padded forward pass
    engine.run_until_idle()
    for one, batched in zip(alone, together, strict=True):
        assert batched.output_ids == one.output_ids  # logprobs: equal up to float rounding (GEMM shapes differ)
        assert [t.logprob for t in batched.prompt_logprobs[1:]] == pytest.approx(
            [t.logprob for t in one.prompt_logprobs[1:]], rel=2e-5, abs=1e-5)
        assert [t.logprob for t in batched.logprobs] == pytest.approx([t.logprob for t in one.logprobs],
                                                                      rel=2e-5, abs=1e-5)


def test_incremental_detokenisation_equals_full_decode(engine: Engine) -> None:
    from serving.engine import Request

    first, second = engine.tokenizer.token_to_id("Ã"), engine.tokenizer.token_to_id("©")  # bytes C3 A9: "é"
    request = Request([1], SamplingParams())
    for token, expected in [(engine.encode(" the")[0], " the"), (first, " the\ufffd"), (second, " theé")]:
        request.output_ids.append(token)
        assert engine._detokenize(request) == expected == engine.decode(request.output_ids)
    hot = dict(max_tokens=40, temperature=3.0, ignore_eos=True)  # random bytes: split UTF-8 characters
    for seed in range(8):
        sampled = engine.generate(engine.encode("the"), SamplingParams(seed=seed, **hot))
        assert sampled.text == engine.decode(sampled.output_ids)


@pytest.mark.parametrize(("params", "field"), [
    (SamplingParams(temperature=-1), "temperature"), (SamplingParams(top_p=0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"), (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(max_tokens=200), "max_tokens"),
])
def test_bad_parameters_name_the_field(engine: Engine, params: SamplingParams, field: str) -> None:
    with pytest.raises(RequestError) as caught:
        engine.submit(engine.encode("the cat"), params)
    assert caught.value.param == field


def test_safe_prefix_holds_back_partial_stops_and_utf8() -> None:
    assert safe_prefix("hello wor", ("world",)) == "hello "
    assert safe_prefix("abc\ufffd", ()) == "abc"
    assert safe_prefix("plain", ("xyz",)) == "plain"


def test_a_large_step_runs_on_the_engines_threads_and_a_small_step_on_one() -> None:
    """`threads`: a step whose tokens x parameters reach PARALLEL_MIN_WORK (here 4 prompts of 100 tokens, 4.5e7)
    runs on 2 torch threads, the decode steps after it (4 rows, 4.5e5) on one; outputs equal the engine without
    `threads`. Run on a thread of its own: OpenMP's thread count belongs to the thread that sets it."""
    from serving.engine import PARALLEL_MIN_WORK

    tokenizer = train_bpe([TEXT] * 20, 300)
    model = Transformer(CONFIG)
    model.init_weights(5)
    prompts = [[(7 * i + j) % 250 + 1 for j in range(100)] for i in range(4)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outputs: dict[int | None, list[list[int]]] = {}
    threads_seen: list[int] = []

    def run(threads: int | None) -> None:
        torch.set_num_threads(1)
        engine = Engine(model, tokenizer, tokenizer.token_to_id(EOT_TOKEN), max_batch=4, threads=threads)
        assert 400 * engine.parameter_count >= PARALLEL_MIN_WORK > 4 * engine.parameter_count
        step = engine.decoder.mixed_step

        def counted(*args: object, **kwargs: object) -> object:
            threads_seen.append(torch.get_num_threads())
            return step(*args, **kwargs)  # type: ignore[arg-type]

        engine.decoder.mixed_step = counted  # type: ignore[method-assign]
        requests = [engine.submit(prompt, params) for prompt in prompts]
        engine.run_until_idle()
        outputs[threads] = [request.output_ids for request in requests]

    before = torch.get_num_threads()
    try:
        for threads in (2, None):
            worker = threading.Thread(target=run, args=(threads,))
            worker.start()
            worker.join()
    finally:
        torch.set_num_threads(before)  # MKL's count is process-wide
    assert threads_seen == [2, 1, 1, 1] + [1, 1, 1, 1]  # prefill of the 4 prompts, then 3 decode steps; twice
    assert outputs[2] == outputs[None] and all(len(output) == 4 for output in outputs[2])
