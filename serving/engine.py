"""The inference engine: KV-cached decoding with continuous batching, sampling, beam search and logprobs.

- `Engine.load(path)`: an HF export directory (`model.safetensors` + Llama `config.json` + tokenizer files),
  a DCP checkpoint directory (`step-*`), or a pretrain stage directory (its `hf/` export, else its latest
  checkpoint).
- Scheduling: requests wait in a queue; each step is one forward pass (`Decoder.mixed_step`) over the
  next token of every running sequence plus the whole prompts of the waiting requests that fit, which then
  join the running batch (`serving.kv_cache.BatchKVCache`, preallocated rows): the weights are read once
  per step however many requests join. Finished sequences leave. `step()` is one such iteration;
  `run_until_idle()` drives it synchronously; `start()` runs it on a background thread (the Serve replica).
- `abort(request)` (any thread): the request leaves at the next step boundary (the Serve replica calls it
  when its caller disconnects or times out).
- Beam search (beam_width > 1) runs as its own batch of beams with a shared-prefix cache that is reordered
  each step; scores are summed logprobs divided by length**length_penalty; with early stopping it ends once
  beam_width hypotheses are finished; the `n_best` best hypotheses are returned.
- Prefix caching (`prefix_cache_mb` > 0, `serving.prefix_cache`): an admitted prompt's cached whole blocks are
  copied into its fresh cache and only the rest is prefilled; its blocks are stored after the prefill.
- Structured output (`SamplingParams.regex`, `serving.structured`): the format's automaton masks each step's
  logits, budget-aware so the request ends in a complete match by `max_tokens`.
- Latency marks per request (queued, admitted, first token, finished) feed the server's metrics.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from dataprep.finetune.chat import CHAT_TEMPLATE
from dataprep.stage import CHECKPOINTS_DIR, HF_DIR, TOKENIZER_DIR
from dataprep.tokenize.tokenizer import load_tokenizer
from serving.kv_cache import BatchKVCache
from serving.prefix_cache import PrefixCache
from serving.sampling import (
    RequestError,
    SamplingParams,
    adjusted_logits,
    adjusts_logits,
    choose_token,
    find_stop,
    make_generator,
    safe_prefix,
)
from serving.structured import Constrained, StructuredVocabulary
from workers.decoder import Decoder
from workers.export import weights_digest
from workers.lora import AdapterError, LoraWeights
from workers.model import KVCache, Transformer
from workers.model_config import ModelConfig, parameter_count

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PARALLEL_MIN_WORK = 2**23
"""A step runs on all of the engine's `threads` when its tokens x the model's parameters reach this, and on one
thread below it. Measured on this 2-core CPU (torch 2.13, fp32, prepacked weights, decode steps of the `small`
shape, 15.7 M parameters), alone: 2 threads against 1 took 4.5-5.1 against 5.0-5.5 ms at 1 row, 7.6 against
9.1 ms at 2, 5.9 against 7.7 ms at 4, 7.2 against 9.4 ms at 8, 10.1 against 13.3 ms at 16. Served (one client,
direct ingress, the engine process beside the replica and Ray's processes): with TCMalloc (`engine_allocator`)
2 threads at one row gave 197-221 tok/s against 180-204 on one thread with glibc's malloc; with glibc's malloc 2
threads gained nothing (171 against 174 tok/s medians of 12 runs). The `tiny` shape (1.3 M) gained nothing at
1-4 rows alone, 18 % at 8 (2.3 against 2.8 ms), 10 % at 16 and 43 % at 64."""


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass
class Request:
    """One sequence being generated; `on_event(kind, payload)` receives "delta" and "done" events."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[str, Any], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    text: str = ""
    streamed: str = ""
    decoded: str = ""  # the text of output_ids[:read_offset] (incremental detokenisation)
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    done: threading.Event = field(default_factory=threading.Event)
    aborted: bool = False  # set by `Engine.abort` from any thread; the scheduler retires it at the next step
    error: Exception | None = None
    started: float = field(default_factory=time.time)
    # latency marks (perf_counter seconds of this process): queued at submit, admitted to the batch, first
    # token chosen, finished; and the batch sizes of the steps it decoded in (summed) for the occupancy metric
    queued_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    batch_rows_sum: int = 0
    cached_tokens: int = 0  # prompt positions reused from the prefix cache
    guide: Constrained | None = None  # structured output: its position in the format's automaton
    adapter: LoraWeights | None = None  # the LoRA adapter its tokens go through (None: the base model)
    extra: dict[str, Any] = field(default_factory=dict)

    def timing(self) -> dict[str, float | None]:
        """Seconds: queue (submit → admitted), time to first token (submit → first token), time per output token
        after the first, end to end in the engine; and the mean batch size of its steps."""
        end = self.finished_at or time.perf_counter()
        first, tokens = self.first_token_at, len(self.output_ids)
        return {"queue_s": None if self.admitted_at is None else self.admitted_at - self.queued_at,
                "ttft_s": None if first is None else first - self.queued_at,
                "tpot_s": (end - first) / (tokens - 1) if first is not None and tokens > 1 else None,
                "engine_s": end - self.queued_at,
                "mean_batch": self.batch_rows_sum / tokens if tokens else None}

    def emit(self, kind: str, payload: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, payload)


def _from_hf(directory: Path) -> tuple[Transformer, Path]:
    from safetensors.torch import load_file

    hf = json.loads((directory / "config.json").read_text())
    config = ModelConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                         n_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"],
                         ffn_dim=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                         rope_theta=hf.get("rope_theta", 10_000.0), norm_eps=hf["rms_norm_eps"],
                         tie_embeddings=hf.get("tie_word_embeddings", False))
    model = Transformer(config)
    state = load_file(str(directory / "model.safetensors"))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model, directory


def load_model(path: Path) -> tuple[Transformer, Path]:
    """Model and tokenizer directory from an HF export, a checkpoint or a pretrain stage directory."""
    from workers.checkpoint import STATE_FILE, latest_checkpoint, load_full_model, read_state

    path = Path(path)
    if (path / HF_DIR / "config.json").is_file():
        return _from_hf(path / HF_DIR)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _from_hf(path)
    checkpoint = path if (path / STATE_FILE).is_file() else latest_checkpoint(path / CHECKPOINTS_DIR)
    if checkpoint is None:
        raise FileNotFoundError(f"{path}: no HF export (config.json + model.safetensors), checkpoint or pretrain stage")
    state = read_state(checkpoint)
    model = load_full_model(checkpoint, Transformer(ModelConfig(**state["model"])))
    return model, Path(state["spec"]["data_dir"]).parent / TOKENIZER_DIR


def _namespace(request: Request) -> bytes:
    """Prefix-cache blocks are per adapter: the same tokens have other keys and values under another adapter."""
    return b"" if request.adapter is None else request.adapter.name.encode()


def stored_chat_template(tokenizer_dir: Path) -> str:
    """The `chat_template` of the tokenizer's `tokenizer_config.json` (what transformers uses), else ours."""
    config = Path(tokenizer_dir) / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return CHAT_TEMPLATE


def _gpt2_byte_order(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + k."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


class Engine:
    """A model, its tokenizer and a continuous-batching scheduler."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, eot_id: int, name: str = "forgeline",
                 max_batch: int = 16, device: torch.device | None = None, prefix_cache_mb: float = 0.0,
                 threads: int | None = None, prepacked: bool = True) -> None:
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()
        # the one inference forward (`self.model` shares its weights); `prepacked`: on CPU in fp32 with a oneDNN copy
        # of each large weight for batched steps (`workers.decoder.prepack`: 5-55 % faster products at 4-32 rows,
        # twice those weights' memory)
        self.decoder = Decoder(self.model, prepacked=prepacked)
        self.tokenizer, self.eot_id, self.name, self.max_batch = tokenizer, eot_id, name, max_batch
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.running: list[Request] = []
        self.cache = BatchKVCache(self.config, self.config.max_seq_len, self.device, self.dtype, max_batch)
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None
        self.beam_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgeline-beam")
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "busy_s": 0.0,
                      "aborted": 0, "masked_tokens": 0, "mask_s": 0.0, "cached_tokens": 0}
        self.prefix_cache = PrefixCache(self.config, int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self._structured: StructuredVocabulary | None = None
        self.adapters: dict[str, LoraWeights] = {}
        self.base_digest: str | None = None  # `workers.export.weights_digest` of the base (set by `load`)
        self.chat_template = CHAT_TEMPLATE
        self.threads = threads  # torch threads of a large step (`PARALLEL_MIN_WORK`); None: leave torch's setting
        self.parameter_count = parameter_count(self.config)["total"]

    def add_adapter(self, name: str, directory: Path) -> LoraWeights:
        """Load a PEFT LoRA adapter to serve as model `name`; refused (AdapterError) when it was trained on
        another base model (its recorded base digest differs) or does not fit this model's shapes."""
        if name == self.name or not name:
            raise AdapterError(f"adapter name {name!r} must differ from the base model's name {self.name!r}")
        adapter = LoraWeights.load(name, directory, self.config, self.dtype, self.device)
        if adapter.base_digest is not None and self.base_digest is not None and adapter.base_digest != self.base_digest:
            raise AdapterError(f"adapter {name!r} ({directory}) was trained on another base model: its base digest "
                               f"{adapter.base_digest} differs from this model's {self.base_digest}")
        self.adapters[name] = adapter
        return adapter

    @classmethod
    def load(cls, path: Path, name: str = "forgeline", max_batch: int = 16, dtype: str = "float32",
             prefix_cache_mb: float = 0.0, threads: int | None = None, prepacked: bool = True) -> Engine:
        """`dtype`: the weights' and KV cache's type, `float32` or `bfloat16` (norms and softmax stay fp32);
        `prefix_cache_mb`: memory for cached prompt-prefix blocks (0: no prefix caching); `threads`: torch threads
        of a large step, in the thread that steps (`PARALLEL_MIN_WORK`); `prepacked`: see `__init__`."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        model, tokenizer_dir = load_model(Path(path))
        tokenizer, eot_id = load_tokenizer(tokenizer_dir)
        digest = weights_digest(model)  # of the fp32 weights, before any cast
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        engine = cls(model.to(DTYPES[dtype]), tokenizer, eot_id, name, max_batch, device, prefix_cache_mb, threads,
                     prepacked)
        engine.base_digest = digest
        engine.chat_template = stored_chat_template(tokenizer_dir)
        return engine

    # ---- text helpers
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """A token's text; a token that is only part of a UTF-8 character is `bytes:\\xNN...` (as OpenAI)."""
        text = self.decode([token_id])
        if "\ufffd" not in text:
            return text
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a byte-level BPE token stands for (GPT-2's byte-to-unicode alphabet, inverted)."""
        if not hasattr(self, "_byte_of"):
            from tokenizers import pre_tokenizers

            alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_gpt2_byte_order)
            self._byte_of = {ch: i for i, ch in enumerate(alphabet)}
        token = self.tokenizer.id_to_token(token_id) or ""
        if all(ch in self._byte_of for ch in token):
            return bytes(self._byte_of[ch] for ch in token)
        return token.encode()

    # ---- requests
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[str, Any], None] | None = None) -> Request:
        """Validate and queue a request (RequestError names the bad field)."""
        params.validate(len(prompt_ids), self.config.max_seq_len)
        if any(not 0 <= t < self.config.vocab_size for t in prompt_ids):
            raise RequestError("prompt", f"token ids must be in [0, {self.config.vocab_size})")
        if any(not 0 <= t < self.config.vocab_size for t, _ in params.logit_bias):
            raise RequestError("logit_bias", f"token ids must be in [0, {self.config.vocab_size})")
        if params.adapter is not None and params.adapter not in self.adapters:
            raise RequestError("model", f"no adapter {params.adapter!r} on this engine")
        request = Request(list(prompt_ids), params, on_event,
                          generator=make_generator(params.seed, torch.device("cpu")),
                          adapter=None if params.adapter is None else self.adapters[params.adapter])
        if params.regex is not None:
            request.guide = self.structured().constrain(params.regex, params.max_tokens)
        self.waiting.put(request)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(prompt_ids)
        self.wakeup.set()
        return request

    def structured(self) -> StructuredVocabulary:
        """The vocabulary for constrained decoding, built on first use (special tokens left out)."""
        if self._structured is None:
            special = set(self.tokenizer.get_added_tokens_decoder())
            self._structured = StructuredVocabulary(self.tokenizer.get_vocab_size(), self.eot_id, self.token_bytes,
                                                    special)
        return self._structured

    def occupancy(self) -> dict[str, Any]:
        """Now: running and waiting sequences, batch occupancy (running / max_batch) and KV cache usage (positions
        held / positions reserved)."""
        held = int(self.cache.lengths.sum()) if self.cache.rows else 0
        return {"running": len(self.running), "waiting": self.waiting.qsize(),
                "batch_occupancy": len(self.running) / self.max_batch,
                "kv_usage": held / (self.max_batch * self.cache.capacity)}

    def abort(self, request: Request) -> None:
        """Stop a request whose caller went away (client disconnect, timeout): it leaves the batch at the next
        step boundary with finish_reason "abort", freeing its row, as vLLM aborts requests. Thread-safe."""
        if not request.done.is_set():
            request.aborted = True
            self.wakeup.set()

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Submit and wait (drives the scheduler itself when no background thread runs)."""
        request = self.submit(prompt_ids, params)
        if self.thread is None:
            self.run_until_idle()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request

    # ---- scheduling
    def start(self) -> None:
        """Run the scheduler on a daemon thread (one per engine)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="forgeline-engine", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            if not self.running and self.waiting.empty():
                self.wakeup.wait(timeout=1.0)
                self.wakeup.clear()
                continue
            self.step()

    def run_until_idle(self) -> None:
        while self.running or not self.waiting.empty():
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One forward pass: the next token of every running sequence and the prompts of the waiting requests
        that fit (their prefill folded into the same pass); finished sequences leave. In inference mode (no
        autograd bookkeeping per op: 3-14 % faster per step than under `no_grad` here, most at batch 1)."""
        started = time.perf_counter()
        for request in self.running:
            if request.aborted:
                request.finish_reason = "abort"
        self._retire()
        admitted = self._take_waiting()
        if self.running or admitted:
            self._guarded(admitted, self._forward)
        self.stats["steps"] += 1
        self.stats["busy_s"] += time.perf_counter() - started

    def _take_waiting(self) -> list[Request]:
        """Waiting requests that fit in the batch (a beam-search request runs to completion here)."""
        admitted: list[Request] = []
        while len(self.running) + len(admitted) < self.max_batch and not self.waiting.empty():
            request = self.waiting.get_nowait()
            if request.aborted:
                request.finish_reason = "abort"
                self._finish(request)
            elif request.params.beam_width > 1:  # its own thread: the batch keeps stepping meanwhile
                self.beam_pool.submit(self._guarded, [request], self._beam_search)
            else:
                admitted.append(request)
        return admitted

    def _guarded(self, requests: list[Request], work: Callable[..., None]) -> None:
        """Run `work(requests...)`; a failure fails those requests, never the engine."""
        try:
            work(*requests)
        except Exception as error:
            for request in requests:
                request.error = error
                request.finish_reason = "error"
                request.done.set()
                request.emit("error", error)

    def _use_threads(self, tokens: int) -> None:
        """With `threads`: set the stepping thread's torch threads for a step of `tokens` tokens, all of `threads`
        from `PARALLEL_MIN_WORK` on, else one (OpenMP's count is per thread, so this is called from the thread that
        runs the step; a change only when the step's size crosses over)."""
        if not self.threads:
            return
        wanted = self.threads if tokens * self.parameter_count >= PARALLEL_MIN_WORK else 1
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)

    @torch.no_grad()
    def _forward(self, *admitted: Request) -> None:
        started = time.perf_counter()
        last = [r.output_ids[-1] for r in self.running]
        prefilled = [self.decoder.new_cache(1, len(r.prompt_ids)) for r in admitted]
        for request, own in zip(admitted, prefilled, strict=True):
            if self.prefix_cache is not None and not request.params.echo:  # echo needs every prompt position's logits
                request.cached_tokens = self.prefix_cache.lookup(request.prompt_ids, own, _namespace(request))
                self.stats["cached_tokens"] += request.cached_tokens
        adapters = [r.adapter for r in self.running] + [r.adapter for r in admitted]
        self._use_threads(len(self.running) + sum(len(r.prompt_ids) - r.cached_tokens for r in admitted))
        logits, prompt_logits, prompt_caches = self.decoder.mixed_step(
            last, self.cache, [r.prompt_ids[r.cached_tokens:] for r in admitted], [r.params.echo for r in admitted],
            prefilled, adapters if any(a is not None for a in adapters) else None)
        if logits is not None:
            greedy = logits.argmax(dim=-1).tolist()  # one op for the batch; used by the greedy rows
            for row, request in enumerate(self.running):
                self._accept(request, logits[row], greedy[row])
        for request, own_logits, own_cache in zip(admitted, prompt_logits, prompt_caches, strict=True):
            request.admitted_at = started
            prompt = request.prompt_ids
            self.cache.add_rows(own_cache, [len(prompt)])
            if self.prefix_cache is not None:
                self.prefix_cache.store(prompt, own_cache, namespace=_namespace(request))
            self.running.append(request)
            if request.params.echo:
                request.prompt_logprobs = [None] + [self._logprob(own_logits[i], prompt[i + 1], request.params.logprobs)
                                                    for i in range(len(prompt) - 1)]
            self._accept(request, own_logits[-1])
        self._retire()

    def _logprob(self, logits: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        alternatives = []
        if top:
            values, ids = torch.topk(logprobs, top)
            alternatives = [(int(i), self.token_text(int(i)), float(v)) for v, i in zip(values, ids, strict=True)]
        return TokenLogprob(token, self.token_text(token), float(logprobs[token]), alternatives)

    def _accept(self, request: Request, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Choose the next token of a running request from its logits row (`greedy`: its argmax, computed for
        the whole batch at once), then check its stop conditions."""
        params, guide = request.params, request.guide
        if adjusts_logits(params):
            logits, greedy = adjusted_logits(logits, params, request.output_ids), None
        if guide is not None:
            masking = time.perf_counter()
            logits, greedy = guide.mask(logits, params.max_tokens - len(request.output_ids)), None
            self.stats["mask_s"] += time.perf_counter() - masking
        if params.temperature == 0 and greedy is not None:
            token = greedy
        else:
            token = choose_token(logits, params, request.generator)  # type: ignore[arg-type]
        if guide is not None and token != self.eot_id:
            advancing = time.perf_counter()
            guide.advance(token)
            self.stats["masked_tokens"] += 1
            self.stats["mask_s"] += time.perf_counter() - advancing
        if params.logprobs is not None:
            request.logprobs.append(self._logprob(logits, token, params.logprobs))
        ends_text = token == self.eot_id and (not params.ignore_eos or guide is not None)
        stop_token = ends_text or token in params.stop_token_ids
        if stop_token:
            request.finish_reason = "stop"
            return
        request.output_ids.append(token)
        request.batch_rows_sum += len(self.running)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        self.stats["generated_tokens"] += 1
        text = self._detokenize(request)
        cut = find_stop(text, params.stop)
        if cut is not None:
            request.text, request.finish_reason = text[:cut], "stop"
            return
        request.text = text
        if guide is not None and guide.complete():
            request.finish_reason = "stop"
            return
        if len(request.output_ids) >= params.max_tokens:
            request.finish_reason = "length"
            return
        ready = safe_prefix(text, params.stop)
        if len(ready) > len(request.streamed):
            request.emit("delta", ready[len(request.streamed):])
            request.streamed = ready

    def _detokenize(self, request: Request) -> str:
        """The output text so far, decoding only the newest tokens (as vLLM and TGI do): a tail ending in an
        incomplete UTF-8 character (U+FFFD) stays pending until the next token completes it."""
        ids = request.output_ids
        settled = self.decode(ids[request.prefix_offset:request.read_offset])
        tail = self.decode(ids[request.prefix_offset:])[len(settled):]
        if tail and not tail.endswith("\ufffd"):
            request.decoded += tail
            request.prefix_offset, request.read_offset = request.read_offset, len(ids)
            tail = ""
        return request.decoded + tail

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self.running) if r.finish_reason is None]
        if len(keep) == len(self.running):
            return
        for request in (r for r in self.running if r.finish_reason is not None):
            self._finish(request)
        self.running = [self.running[i] for i in self.cache.keep_rows(keep)]

    def _finish(self, request: Request) -> None:
        request.finished_at = time.perf_counter()
        if request.finish_reason == "abort":
            self.stats["aborted"] += 1
        if len(request.text) > len(request.streamed):
            request.emit("delta", request.text[len(request.streamed):])
            request.streamed = request.text
        request.done.set()
        request.emit("done", request)

    # ---- beam search
    @torch.inference_mode()
    def _beam_search(self, request: Request) -> None:
        """Length-normalised beam search (score = sum logprob / length**length_penalty)."""
        params, width = request.params, request.params.beam_width
        request.admitted_at = time.perf_counter()
        prompt = request.prompt_ids
        cache = KVCache(self.config, 1, len(prompt) + params.max_tokens, self.device, self.dtype)
        logits = self.decoder(torch.tensor([prompt], device=self.device), cache, request.adapter)[:, -1]
        beams: list[tuple[list[int], float]] = [([], 0.0)]
        finished: list[tuple[list[int], float]] = []

        def normalised(tokens: list[int], total: float) -> float:
            return total / max(1, len(tokens)) ** params.length_penalty

        for _ in range(params.max_tokens):
            if request.aborted:  # its caller went away: stop searching
                request.finish_reason = "abort"
                self._finish(request)
                return
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            candidates = []
            for row, (_tokens, total) in enumerate(beams):
                values, ids = torch.topk(logprobs[row], width + 1)
                candidates += [(total + float(v), row, int(i)) for v, i in zip(values, ids, strict=True)]
            candidates.sort(key=lambda c: -c[0])
            alive: list[tuple[list[int], float]] = []
            rows: list[int] = []
            for total, row, token in candidates:
                tokens = beams[row][0] + [token]
                if token == self.eot_id or token in params.stop_token_ids:
                    finished.append((beams[row][0], total))
                elif len(alive) < width:
                    alive.append((tokens, total))
                    rows.append(row)
                if len(alive) == width:
                    break
            if params.early_stopping and len(finished) >= width or not alive:
                break
            beams = alive
            if cache.keys[0].shape[0] != len(rows) or rows != list(range(len(rows))):
                cache.reorder(torch.tensor(rows, device=self.device))
            logits = self.decoder(torch.tensor([[t[-1]] for t, _ in beams], device=self.device), cache,
                                  request.adapter)[:, -1]
        ranked = sorted(finished + beams, key=lambda b: -normalised(*b))
        hypotheses: list[dict[str, Any]] = []
        for tokens, total in ranked[:params.n_best]:
            text = self.decode(tokens)
            cut = find_stop(text, params.stop)
            stopped = cut is not None or (tokens, total) in finished
            hypotheses.append({"output_ids": tokens, "text": text if cut is None else text[:cut],
                               "finish_reason": "stop" if stopped else "length", "score": normalised(tokens, total)})
        best = hypotheses[0]
        request.output_ids, request.text = best["output_ids"], best["text"]
        request.finish_reason = best["finish_reason"]
        request.extra["beam_score"] = best["score"]
        request.extra["beams"] = hypotheses
        self.stats["generated_tokens"] += len(request.output_ids)
        self._finish(request)
