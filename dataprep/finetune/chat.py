"""The chat template: one Jinja string, stored with the tokenizer as Hugging Face's `chat_template`, rendered the
same way here, by the server and by `transformers`' `apply_chat_template`.

A message is `<|role|>\\n` + content + the end-of-text token; the generation prompt is `<|assistant|>\\n`, so a
model tuned on it ends its answer with end-of-text, the token the engine stops at. The role headers are plain
text (the tokenizer has one special token, end-of-text): the pretrained vocabulary and embedding stay as they
are, so an adapter applies to the exported base model unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    # the environment transformers renders chat templates in (sandboxed, trim_blocks, lstrip_blocks)
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template)


def render_chat(messages: Sequence[dict[str, str]], eos_token: str, add_generation_prompt: bool,
                template: str = CHAT_TEMPLATE) -> str:
    """The prompt text of `messages` ({role, content} dicts) under `template`."""
    return str(_compiled(template).render(messages=list(messages), eos_token=eos_token,
                                          add_generation_prompt=add_generation_prompt))


def assistant_spans(messages: Sequence[dict[str, str]], eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model learns to write: each assistant message's
    content and the end-of-text token after it."""
    text, spans = "", []
    for message in messages:
        header = render_chat([{**message, "content": ""}], eos_token, False)[: -len(eos_token)]
        start = len(text) + len(header)
        text += render_chat([message], eos_token, False)
        if message["role"] == "assistant":
            spans.append((start, len(text)))
    return text, spans
