"""Sampling parameters and token choice: greedy, temperature, top-k, top-p, seeded generators; stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dataprep.errors import FieldError


class RequestError(FieldError):
    """A request parameter is out of range; `param` names it (HTTP 400)."""


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. temperature 0 = greedy; beam_width > 1 = beam search (length-normalised)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    echo: bool = False
    beam_width: int = 1
    n_best: int = 1  # beam search: how many of the best hypotheses to return (OpenAI `n`)
    length_penalty: float = 1.0
    early_stopping: bool = True
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    regex: str | None = None  # structured output: the output must match (serving.structured)
    adapter: str | None = None  # the LoRA adapter to generate with (None: the base model)
    extra: dict[str, object] = field(default_factory=dict)

    def validate(self, prompt_tokens: int, context: int) -> None:
        if self.max_tokens < 1:
            raise RequestError("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError("top_k", f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError("logprobs", f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.beam_width < 1:
            raise RequestError("beam_width", f"beam_width must be at least 1, got {self.beam_width}")
        if not 1 <= self.n_best <= self.beam_width:
            raise RequestError("n", f"n ({self.n_best}) must be in [1, beam width {self.beam_width}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise RequestError("logit_bias", "biases must be in [-100, 100]")
        if self.regex is not None and self.beam_width > 1:
            raise RequestError("response_format", "structured output does not combine with beam search")
        if prompt_tokens == 0:
            raise RequestError("prompt", "the prompt is empty")
        if prompt_tokens + self.max_tokens > context:
            raise RequestError("max_tokens", f"prompt ({prompt_tokens} tokens) + max_tokens ({self.max_tokens}) "
                                             f"exceeds the context window of {context} tokens")


def adjusts_logits(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.logit_bias)


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    """A (vocab,) logits row with OpenAI's logit_bias added and presence/frequency penalties applied to the tokens
    generated so far (the prompt's are not penalised, as OpenAI and vLLM)."""
    adjusted = logits.float().clone()
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias, strict=True)
        adjusted[list(ids)] += torch.tensor(biases)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids), minlength=adjusted.shape[-1])[:adjusted.shape[-1]].float()
        adjusted -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return adjusted


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return generator


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus: the smallest set whose probability reaches p)."""
    scaled = logits.float() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        threshold = torch.topk(scaled, params.top_k).values[..., -1, None]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p  # keep until p is reached
        scaled = scaled.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return scaled


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a (vocab,) logits row."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(filtered_logits(logits, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [text.find(stop) for stop in stops if stop and stop in text]
    return min(hits) if hits else None


def safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` that can be streamed now: no partial UTF-8 tail, no possible start of a stop string."""
    cut = len(text)
    while cut and text[cut - 1] == "\ufffd":
        cut -= 1
    for stop in stops:
        for size in range(min(len(stop) - 1, cut), 0, -1):
            if text[:cut].endswith(stop[:size]):
                cut -= size
                break
    return text[:cut]
