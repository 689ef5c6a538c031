"""Evaluate one checkpoint on a worker: held-out perplexity and bits per byte, few-shot choice tasks, generation.

`evaluate_checkpoint` loads the DCP checkpoint into an unsharded model in one process (GPU when the worker has
one), reads the held-out windows and the tokenizer of the run it was trained on (recorded in the checkpoint's
spec), and returns long-format rows `(task, metric, value)` plus per-task errors: a broken task file is an
error for that task only; a checkpoint that cannot be loaded is an error for that checkpoint only.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, pre_tokenizers
from torch.distributed.checkpoint.api import CheckpointException

from dataprep.evaluate.tasks import TaskError, TaskSpec, read_examples, score_choices, score_generation
from dataprep.stage import TOKENIZER_DIR
from dataprep.tokenize.packing import TokenWindows
from dataprep.tokenize.tokenizer import load_tokenizer
from workers.checkpoint import STATE_FILE, load_full_model, read_state
from workers.decoder import Decoder
from workers.model import Transformer
from workers.model_config import ModelConfig

PERPLEXITY_TASK = "heldout"


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (byte-level BPE: one byte per symbol; special tokens count 0)."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, token_id in tokenizer.get_vocab().items():
        if token in specials:
            continue
        lengths[token_id] = len(token) if all(ch in alphabet for ch in token) else len(token.encode())
    return lengths


def perplexity(decoder: Decoder, windows: TokenWindows, byte_lengths: np.ndarray, max_windows: int,
               batch: int) -> dict[str, float]:
    """exp(mean NLL per predicted token) and bits per byte (NLL in bits / UTF-8 bytes of the targets)."""
    count = min(max_windows, len(windows))
    if count == 0:
        raise ValueError("no held-out windows to evaluate perplexity on")
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for start in range(0, count, batch):
        data = torch.from_numpy(windows.batch(range(start, min(count, start + batch)))).to(decoder.device)
        inputs, targets = data[:, :-1], data[:, 1:]
        logits = decoder(inputs, decoder.new_cache(*inputs.shape)).float()
        total_nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        total_tokens += targets.numel()
        total_bytes += int(byte_lengths[targets.cpu().numpy()].sum())
    mean = total_nll / total_tokens
    return {"nll": mean, "perplexity": math.exp(mean), "bits_per_byte": total_nll / math.log(2) / total_bytes,
            "tokens": total_tokens}


def continuation_logprob(decoder: Decoder, prompt_ids: list[int], continuation_ids: list[int]) -> float:
    """log P(continuation | prompt), prompt truncated from the left to fit the context."""
    context = decoder.config.max_seq_len
    room = context - len(continuation_ids)
    ids = prompt_ids[-room:] + continuation_ids if room > 0 else continuation_ids[-context:]
    tokens = torch.tensor([ids], device=decoder.device)
    logits = decoder(tokens[:, :-1], decoder.new_cache(1, len(ids) - 1))
    logprobs = F.log_softmax(logits.float(), dim=-1)[0]
    picked = logprobs.gather(1, tokens[0, 1:, None])[:, 0]
    return float(picked[-len(continuation_ids):].sum())


def greedy_generate(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, stop_id: int | None) -> list[int]:
    """Greedy decoding with a KV cache; stops at `stop_id` or the context limit."""
    limit = decoder.config.max_seq_len
    prompt_ids = prompt_ids[-(limit - 1):]
    budget = min(max_new_tokens, limit - len(prompt_ids))
    cache = decoder.new_cache(1, len(prompt_ids) + budget)
    out: list[int] = []
    logits = decoder(torch.tensor([prompt_ids], device=decoder.device), cache)
    for _ in range(budget):
        token = int(logits[0, -1].argmax())
        if token == stop_id:
            break
        out.append(token)
        if len(out) == budget:
            break
        logits = decoder(torch.tensor([[token]], device=decoder.device), cache)
    return out


def load_error_message(error: BaseException) -> str:
    """DCP wraps per-rank failures (e.g. a size mismatch from another model shape) in a CheckpointException."""
    if isinstance(error, CheckpointException):
        return "; ".join(str(failure[0] if isinstance(failure, tuple) else failure)
                         for failure in error.failures.values())
    return str(error)


def load_checkpoint_model(checkpoint: Path, device: torch.device) -> tuple[Transformer, dict[str, Any]]:
    """Model of a complete checkpoint (train_state.json present), in eval mode on `device`."""
    if not (checkpoint / STATE_FILE).is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE})")
    state = read_state(checkpoint)
    model = load_full_model(checkpoint, Transformer(ModelConfig(**state["model"])))
    return model.to(device).eval(), state


def _task_rows(task: TaskSpec, decoder: Decoder, tokenizer: Tokenizer, eot_id: int,
               ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    examples = read_examples(task)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    if task.type == "choice":
        scores = score_choices(task, examples, lambda prompt, cont: continuation_logprob(
            decoder, encode(prompt), encode(cont)))
        return [{"task": task.name, "metric": k, "value": float(v)} for k, v in scores.items()], []
    scores, samples = score_generation(task, examples, lambda prompt, n: tokenizer.decode(
        greedy_generate(decoder, encode(prompt), n, eot_id)))
    return [{"task": task.name, "metric": k, "value": float(v)} for k, v in scores.items()], samples


def evaluate_checkpoint(checkpoint: str, tasks: list[dict[str, Any]], max_windows: int, batch: int
                        ) -> dict[str, Any]:
    """All metrics of one checkpoint: {"step", "tokens", "rows", "errors", "samples"}."""
    path = Path(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, state = load_checkpoint_model(path, device)
    except (Exception, CheckpointException) as error:  # this checkpoint's error, not the whole evaluation's
        return {"step": None, "tokens": None, "rows": [], "samples": {},
                "errors": [{"task": "*", "error": f"{path.name}: cannot load: {load_error_message(error)}"}]}
    try:
        data_dir = Path(state["spec"]["data_dir"])
        tokenizer, eot_id = load_tokenizer(data_dir.parent / TOKENIZER_DIR)
    except (KeyError, ValueError) as error:
        return {"step": state["step"], "tokens": None, "rows": [], "samples": {},
                "errors": [{"task": "*", "error": f"{path.name}: no tokenizer/held-out data: {error}"}]}
    rows, errors, samples = [], [], {}
    decoder = Decoder(model)
    try:
        held = perplexity(decoder, TokenWindows(data_dir, "val"), token_byte_lengths(tokenizer), max_windows, batch)
        rows += [{"task": PERPLEXITY_TASK, "metric": k, "value": float(v)} for k, v in held.items()]
    except Exception as error:
        errors.append({"task": PERPLEXITY_TASK, "error": str(error)})
    for raw in tasks:
        task = TaskSpec.model_validate(raw)
        try:
            task_rows, task_samples = _task_rows(task, decoder, tokenizer, eot_id)
            rows += task_rows
            if task_samples:
                samples[task.name] = task_samples
        except TaskError as error:
            errors.append({"task": task.name, "error": str(error)})
        except Exception as error:
            errors.append({"task": task.name, "error": f"{error}\n{traceback.format_exc(limit=3)}"})
    tokens = state.get("metrics", {}).get("tokens", 0)
    return {"step": state["step"], "tokens": tokens, "rows": rows, "errors": errors, "samples": samples}


@ray.remote(num_cpus=1, max_retries=2)
def evaluate_checkpoint_task(checkpoint: str, tasks: list[dict[str, Any]], max_windows: int, batch: int
                             ) -> dict[str, Any]:
    """Ray entry: one checkpoint per task (request a GPU with `.options(num_gpus=1)`)."""
    torch.set_num_threads(1)
    return evaluate_checkpoint(checkpoint, tasks, max_windows, batch)
