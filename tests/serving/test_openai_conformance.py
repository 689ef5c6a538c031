"""The HTTP surface against the OpenAI API reference: every response body validates as the official `openai`
client's own types (Completion, ChatCompletion, ChatCompletionChunk, Model, error bodies), request fields the
reference defines are honoured or refused with a 400 naming them, and the behaviours found wrong by trying the
endpoints (text offsets of byte tokens, echo when streaming, n beams, include_usage, detokenize range, the
top_logprobs error) each have a test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serving.engine import Engine
from tests.serving.test_http import client, model_dir, server  # noqa: F401  (the served tiny model)

pytestmark = pytest.mark.integration
CHAT = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}


def events(http: httpx.Client, path: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, json={**payload, "stream": True}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in stream.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_completion_bodies_are_the_reference_types(client: httpx.Client) -> None:  # noqa: F811
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": 4,
                                                 "logprobs": 1}).json()
    parsed = Completion.model_validate(body)
    assert parsed.object == "text_completion" and parsed.usage is not None
    assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
    assert parsed.choices[0].finish_reason in ("stop", "length") and parsed.choices[0].logprobs is not None
    chunks = events(client, "/v1/completions", {"model": "tiny", "prompt": "the", "max_tokens": 3})
    for chunk in chunks:  # the client reads stream chunks as Completion without validating (finish_reason null)
        assert {"id", "object", "created", "model", "choices"} <= set(chunk) and chunk["object"] == "text_completion"
        assert all(set(c) == {"index", "text", "logprobs", "finish_reason"} for c in chunk["choices"])
    Completion.model_validate(chunks[-1])  # the last chunk carries the finish reason


def test_chat_bodies_are_the_reference_types(client: httpx.Client) -> None:  # noqa: F811
    body = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4, "logprobs": True,
                                                      "top_logprobs": 2}).json()
    parsed = ChatCompletion.model_validate(body)
    assert parsed.object == "chat.completion" and parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.content
    assert all(len(entry.top_logprobs) == 2 for entry in parsed.choices[0].logprobs.content)
    chunks = [ChatCompletionChunk.model_validate(c) for c in events(client, "/v1/chat/completions",
                                                                    {**CHAT, "max_tokens": 4})]
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.usage is None for chunk in chunks), "no usage unless stream_options.include_usage"


def test_models_and_errors_are_the_reference_shapes(client: httpx.Client) -> None:  # noqa: F811
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [Model.model_validate(m).id for m in listing["data"]] == ["tiny", "tiny-a", "tiny-b"]  # base + adapters
    error = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": -1})
    assert error.status_code == 400
    assert set(error.json()["error"]) == {"message", "type", "param", "code"}
    missing = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_text_offset_counts_characters_not_byte_token_names(client: httpx.Client) -> None:  # noqa: F811
    """"é" is two byte-level tokens for a tokenizer trained on ASCII: the first stands for an incomplete character
    (shown as `bytes:\\xc3`) and adds no characters; offsets index the returned (echoed) text."""
    prompt = "né"
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3, "echo": True,
                                                 "logprobs": 0, "temperature": 0, "ignore_eos": True}).json()
    choice = body["choices"][0]
    logprobs, text = choice["logprobs"], choice["text"]
    assert logprobs["tokens"][:3] == ["n", "bytes:\\xc3", "bytes:\\xa9"]
    prompt_count = body["usage"]["prompt_tokens"]
    offsets = logprobs["text_offset"]
    assert offsets[:prompt_count] == [0, 1, 1] and prompt_count == 3, logprobs["tokens"]
    assert offsets[prompt_count] == len(prompt), "the first generated token starts after the echoed prompt"
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)


def test_echo_is_streamed_too(client: httpx.Client) -> None:  # noqa: F811
    payload = {"model": "tiny", "prompt": "the sun", "max_tokens": 5, "temperature": 0, "echo": True,
               "ignore_eos": True}
    whole = client.post("/v1/completions", json=payload).json()["choices"][0]["text"]
    streamed = "".join(c["choices"][0]["text"] for c in events(client, "/v1/completions", payload) if c["choices"])
    assert whole.startswith("the sun") and streamed == whole


def test_n_beams_are_the_n_best_distinct_hypotheses(client: httpx.Client) -> None:  # noqa: F811
    payload = {"model": "tiny", "prompt": "the cat", "max_tokens": 4, "use_beam_search": True, "n": 3,
               "best_of": 4, "ignore_eos": True}
    choices = client.post("/v1/completions", json=payload).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["text"] for c in choices}) == 3, [c["text"] for c in choices]
    best = client.post("/v1/completions", json={**payload, "n": 1}).json()["choices"]
    assert best[0]["text"] == choices[0]["text"], "the first of n beams is the single best beam"
    assert client.post("/v1/completions", json={**payload, "stream": True}).json()["error"]["param"] == "stream"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stream_options_include_usage(client: httpx.Client, path: str) -> None:  # noqa: F811
    payload: dict[str, Any] = {**CHAT} if "chat" in path else {"model": "tiny", "prompt": "the"}
    payload.update(max_tokens=4, temperature=0, n=2)
    plain = events(client, path, payload)
    assert all("usage" not in chunk or chunk["usage"] is None for chunk in plain)
    counted = events(client, path, {**payload, "stream_options": {"include_usage": True}})
    *body, last = counted
    assert last["choices"] == [] and all(chunk["usage"] is None for chunk in body)
    generated = client.post(path, json=payload).json()["usage"]
    assert last["usage"]["prompt_tokens"] == generated["prompt_tokens"], "the prompt counted once, not per choice"
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]


def test_detokenize_out_of_range_is_400(client: httpx.Client) -> None:  # noqa: F811
    response = client.post("/detokenize", json={"tokens": [5, 300]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize(("payload", "param"), [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options.include_usage"),
])
def test_chat_field_errors_name_the_field(client: httpx.Client, payload: dict[str, Any], param: str) -> None:  # noqa: F811
    response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2, **payload})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_logit_bias_and_penalties_change_the_choice(client: httpx.Client, model_dir: Path) -> None:  # noqa: F811
    engine = Engine.load(model_dir)
    id_of = {engine.token_text(i): i for i in range(engine.config.vocab_size)}
    base = {"model": "tiny", "prompt": "the cat", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    greedy = client.post("/v1/completions", json=base).json()["choices"][0]["logprobs"]
    first = id_of[greedy["tokens"][0]]
    forced = client.post("/v1/completions", json={**base, "logit_bias": {str(first): -100}}).json()
    assert forced["choices"][0]["logprobs"]["tokens"][0] != greedy["tokens"][0], "a -100 bias bans the token"
    favoured = client.post("/v1/completions", json={**base, "logit_bias": {"7": 100}}).json()
    assert {id_of[t] for t in favoured["choices"][0]["logprobs"]["tokens"]} == {7}, "+100 forces it every step"
    penalised = client.post("/v1/completions", json={**base, "logit_bias": {"7": 5}, "frequency_penalty": 2,
                                                      "presence_penalty": 2}).json()
    repeated = client.post("/v1/completions", json={**base, "logit_bias": {"7": 5}}).json()
    count = [c["choices"][0]["logprobs"]["tokens"].count(repeated["choices"][0]["logprobs"]["tokens"][0])
             for c in (repeated, penalised)]
    assert count[1] < count[0], f"penalties reduce repetition: {count}"
