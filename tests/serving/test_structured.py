"""Structured output: every sample of an untrained model, constrained by a schema's token masks, parses as JSON and
validates against the schema (several schemas × seeds, sampled and greedy); bad formats are errors naming
`response_format`; over HTTP on completions and chat."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from serving.engine import Engine
from serving.sampling import RequestError, SamplingParams
from serving.structured import regex_for
from tests.serving.test_http import client, model_dir, server  # noqa: F401  (the served tiny model)

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog", "sun"]},
                                      "note": {"type": ["string", "null"], "maxLength": 6}},
     "required": ["ok", "kind", "note"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                               "maxItems": 3},
                                      "where": {"type": "object", "properties": {"x": {"type": "number"}},
                                                "required": ["x"]}},
     "required": ["tags", "where"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:  # noqa: F811
    return Engine.load(model_dir)


def generate(engine: Engine, response_format: dict[str, Any], seed: int | None, temperature: float,
             max_tokens: int = 400) -> Any:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                            regex=regex_for(response_format))
    request = engine.generate(engine.encode("the cat sat on"), params)
    assert request.finish_reason == "stop", f"unfinished after {len(request.output_ids)} tokens: {request.text!r}"
    return json.loads(request.text)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "enum-bool-null", "nested", "array"])
def test_every_sample_validates_against_its_schema(engine: Engine, schema: dict[str, Any]) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    outputs = [generate(engine, response_format, seed, 1.0) for seed in range(6)]
    outputs.append(generate(engine, response_format, None, 0.0))
    for output in outputs:
        jsonschema.validate(output, schema)
    assert len({json.dumps(o) for o in outputs}) > 1, "sampling still varies inside the schema"


def test_a_tight_budget_still_ends_in_a_valid_match(engine: Engine) -> None:
    """Near max_tokens the mask steers to the end: with a budget a few tokens above the format's minimum every
    sample still completes and validates; below the minimum the request is refused naming max_tokens."""
    schema = SCHEMAS[0]
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    fewest = engine.structured().constrain(regex_for(response_format) or "", 1000).fewest_tokens()
    assert fewest > 5
    for seed in range(6):
        jsonschema.validate(generate(engine, response_format, seed, 1.0, max_tokens=fewest + 3), schema)
    with pytest.raises(RequestError) as caught:
        engine.submit(engine.encode("x"), SamplingParams(max_tokens=fewest - 1, regex=regex_for(response_format)))
    assert caught.value.param == "max_tokens"


def test_json_object_is_an_object(engine: Engine) -> None:
    for seed in range(4):
        assert isinstance(generate(engine, {"type": "json_object"}, seed, 1.0), dict)


def test_unconstrained_output_is_not_json(engine: Engine) -> None:
    """The constraint does the work: the same untrained model without it does not write JSON."""
    text = engine.generate(engine.encode("the cat sat on"), SamplingParams(max_tokens=20, seed=0)).text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("response_format", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "xml"},
])
def test_bad_formats_name_response_format(response_format: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as caught:
        regex_for(response_format)
    assert caught.value.param == "response_format"


@pytest.mark.integration
def test_response_format_over_http(client: httpx.Client) -> None:  # noqa: F811
    schema = SCHEMAS[0]
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    chat = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "who?"}], "max_tokens": 300, "seed": 3,
        "response_format": response_format}).json()
    jsonschema.validate(json.loads(chat["choices"][0]["message"]["content"]), schema)
    completion = client.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 300,
                                                       "response_format": {"type": "json_object"}}).json()
    assert isinstance(json.loads(completion["choices"][0]["text"]), dict)
    bad = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                     "response_format": {"type": "json_schema", "json_schema": {
                                                         "name": "x", "schema": {"type": "objec"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    stats = client.get("/engine_stats").json()
    assert stats["masked_tokens"] > 0 and stats["mask_s"] > 0
