"""The OpenAI-compatible HTTP API on a real local Ray Serve app (loopback), with a tiny exported model; the main
app is built from infra/serve.yaml as `serve deploy` would build it (schema-validated, import path + args)."""

from __future__ import annotations

import importlib
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from dataprep.tokenize.tokenizer import save_tokenizer, train_bpe
from serving.engine_process import allocator_library
from tests.adapters import make_adapter
from workers.checkpoint import save_checkpoint
from workers.export import export_hf
from workers.model import Transformer
from workers.model_config import ModelConfig

pytestmark = pytest.mark.integration
SERVE_CONFIG = Path(__file__).resolve().parents[2] / "infra" / "serve.yaml"
CONFIG = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=4096)
TEXT = "the cat sat on the mat. a dog ran in the park. the sun is hot and the sky is blue."


def assert_default_allocator(preloaded: list[str]) -> None:
    """`preloaded` (library paths or names an engine process reports) is TCMalloc exactly when this system has it
    (`engine_allocator: auto`, the default), else nothing."""
    tcmalloc = allocator_library("auto")
    assert [Path(path).name.startswith(Path(tcmalloc).name) for path in preloaded] == (
        [True] if tcmalloc else []), preloaded


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served")
    model = Transformer(CONFIG)
    model.init_weights(5)
    checkpoint = save_checkpoint(root / "ckpt", 1, model, torch.optim.AdamW(model.parameters()),
                                 {"model": CONFIG.to_dict()}, keep_last=1)
    save_tokenizer(train_bpe([TEXT] * 20, 300), root / "tok")
    make_adapter(model, root / "adapter-a", seed=1)
    make_adapter(model, root / "adapter-b", seed=2, targets=("q_proj", "v_proj"))
    return export_hf(checkpoint, root / "tok", root / "hf")


def app_from_serve_config(**overrides: object) -> object:
    """The application `serve deploy infra/serve.yaml` would build: the file validated with Serve's own deploy
    schema, its import path imported and called with its args (`overrides` replaced: the model, its name)."""
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    app = config.applications[0]
    module, attribute = app.import_path.split(":")
    return getattr(importlib.import_module(module), attribute)({**app.args, **overrides})


@pytest.fixture(scope="module")
def server(model_dir: Path, ray_local: None) -> Iterator[dict[str, str]]:
    from ray import serve

    from serving.app import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    adapters = {"tiny-a": str(model_dir.parent / "adapter-a"), "tiny-b": str(model_dir.parent / "adapter-b")}
    serve.run(app_from_serve_config(model=str(model_dir), name="tiny", engine_cpus=0.5, adapters=adapters),
              name="open", route_prefix="/")
    serve.run(app_builder({"model": str(model_dir), "name": "tiny", "engine_cpus": 0.5, "api_key": "sekret",
                           "request_timeout_s": 0.001}),  # below one handle round trip: every generate → 408
              name="secured", route_prefix="/secured")
    yield {"base": f"http://127.0.0.1:{port}", "secured": f"http://127.0.0.1:{port}/secured"}
    serve.shutdown()


@pytest.fixture()
def client(server: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server["base"], timeout=60) as http:
        yield http


def test_info_endpoints(client: httpx.Client) -> None:
    health = client.get("/health").json()
    assert health == {"status": "ok", "dtype": "float32", "torch_threads": 1, "preloaded": health["preloaded"]}
    assert_default_allocator(health["preloaded"])
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    tokens = client.post("/tokenize", json={"prompt": "the cat"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 4096
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "the cat"
    assert client.get("/tokenizer_info").json()["eos_token"] == "<|endoftext|>"
    assert "forgeline_requests_total" in client.get("/metrics").text


@pytest.mark.parametrize("prompt", ["the cat", ["the cat", "a dog"], [5, 9, 13], [[5, 9], [13, 14, 15]]])
def test_completion_prompt_forms(client: httpx.Client, prompt: object) -> None:
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 5,
                                                 "temperature": 0, "ignore_eos": True}).json()
    count = 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else 2  # type: ignore[index]
    assert len(body["choices"]) == count and body["usage"]["completion_tokens"] == 5 * count
    assert all(c["finish_reason"] == "length" for c in body["choices"])


def test_echo_logprobs_and_n(client: httpx.Client) -> None:
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "the cat sat", "max_tokens": 3, "n": 3,
                                                 "temperature": 1.0, "seed": 7, "echo": True, "logprobs": 2,
                                                 "ignore_eos": True}).json()
    assert len(body["choices"]) == 3
    first = body["choices"][0]
    assert first["text"].startswith("the cat sat")
    logprobs = first["logprobs"]
    assert logprobs["token_logprobs"][0] is None and len(logprobs["tokens"]) == body["usage"]["prompt_tokens"] + 3
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:]), logprobs["top_logprobs"]


def test_streaming_completion_and_chat_end_with_done(client: httpx.Client) -> None:
    with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 8,
                                                          "temperature": 0, "stream": True, "ignore_eos": True,
                                                          "stream_options": {"include_usage": True}}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    plain = client.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 8, "temperature": 0,
                                                  "ignore_eos": True}).json()
    assert text == plain["choices"][0]["text"] and chunks[-1]["usage"]["completion_tokens"] == 8
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}) as s:
        chat_lines = [line for line in s.iter_lines() if line]
    assert chat_lines[-1] == "data: [DONE]"
    assert json.loads(chat_lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_client_disconnect_aborts_the_request(client: httpx.Client, server: dict[str, str]) -> None:
    """A client that leaves (closes its stream, or times out on a plain request) frees its engine row: Serve cancels
    the call and the replica aborts the request."""
    before = client.get("/engine_stats").json()
    with httpx.Client(base_url=server["base"], timeout=60) as http, http.stream(
            "POST", "/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 4000, "temperature": 0,
                                             "stream": True, "ignore_eos": True}) as stream:
        first = next(line for line in stream.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["text"] is not None  # it was generating when the client left
    deadline = time.time() + 60
    while (stats := client.get("/engine_stats").json())["aborted"] == before["aborted"] and time.time() < deadline:
        time.sleep(0.1)
    assert stats["aborted"] == before["aborted"] + 1 and stats["running"] == 0
    assert stats["generated_tokens"] - before["generated_tokens"] < 4000, "stopped before max_tokens"
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming caller that gives up: the same
        client.post("/v1/completions", timeout=0.5, json={"model": "tiny", "prompt": "the", "max_tokens": 4000,
                                                          "temperature": 0, "ignore_eos": True})
    deadline = time.time() + 60
    while (after := client.get("/engine_stats").json())["aborted"] == stats["aborted"] and time.time() < deadline:
        time.sleep(0.1)
    assert after["aborted"] == stats["aborted"] + 1 and after["running"] == 0
    assert after["generated_tokens"] - stats["generated_tokens"] < 4000  # ~1,000 tokens/s: ~4 s to finish


def test_openai_client_unchanged(server: dict[str, str]) -> None:
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused")
    completion = api.completions.create(model="tiny", prompt="the sky", max_tokens=4, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens <= 4
    chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat?"}], max_tokens=5)
    assert chat.choices[0].message.role == "assistant"
    whole = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=6,
                                        temperature=0)
    chunks = list(api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                              max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed_text == whole.choices[0].message.content, "streaming gives the text a plain call gives"
    assert [m.id for m in api.models.list()] == ["tiny", "tiny-a", "tiny-b"]


@pytest.mark.parametrize(("payload", "param"), [
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 4096}, "max_tokens"),
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": [[]]}, "prompt"),
    ({"model": "tiny", "prompt": ["", "The"]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 3, "use_beam_search": True, "best_of": 2}, "best_of"),
])
def test_bad_requests_are_400_naming_the_field(client: httpx.Client, payload: dict, param: str) -> None:
    response = client.post("/v1/completions", json=payload)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_invalid_json_key_and_timeout(client: httpx.Client, server: dict[str, str]) -> None:
    bad = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    with httpx.Client(base_url=server["secured"], timeout=60) as secured:
        assert secured.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
        slow = secured.post("/v1/completions", headers={"Authorization": "Bearer sekret"},
                            json={"model": "tiny", "prompt": "the", "max_tokens": 100, "ignore_eos": True})
        assert slow.status_code == 408, slow.text
    wrong_method = client.get("/v1/completions")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/health").status_code == 200, "the replica survived every bad request"


def test_32_concurrent_clients_all_answered(server: dict[str, str]) -> None:
    def one(index: int) -> int:
        with httpx.Client(base_url=server["base"], timeout=120) as http:
            response = http.post("/v1/completions", json={"model": "tiny", "prompt": f"the cat {index}",
                                                           "max_tokens": 12, "ignore_eos": True, "seed": index})
            return response.status_code if response.json()["usage"]["completion_tokens"] == 12 else -1

    with ThreadPoolExecutor(max_workers=32) as pool:
        assert list(pool.map(one, range(32))) == [200] * 32


def test_lm_evaluation_harness_local_completions(server: dict[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """EleutherAI's harness, unchanged, against our server: a loglikelihood and a generate_until task."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    rows = [{"question": f"the {w} sat on the", "choices": ["mat", "sky"], "label": 0, "answer": "mat"}
            for w in ("cat", "dog", "sun", "park")]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
              "test_split: test\ndoc_to_text: '{{question}}'\n")
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\noutput_type: multiple_choice\n" + common +
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "tiny_gen.yaml").write_text(
        "task: tiny_gen\noutput_type: generate_until\n" + common +
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={server['base']}/v1/completions,tokenizer_backend=remote,"
                   "num_concurrent=1,max_retries=1",
        tasks=["tiny_choice", "tiny_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
        limit=4, log_samples=True)
    assert 0.0 <= results["results"]["tiny_choice"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["results"]["tiny_gen"]
    # the harness's loglikelihoods are the engine's own: sum of the continuation's echoed prompt logprobs
    checked = 0
    with httpx.Client(base_url=server["base"], timeout=60) as client:
        for sample in results["samples"]["tiny_choice"]:
            context = sample["doc"]["question"]
            for choice, response in zip(sample["doc"]["choices"], sample["resps"], strict=True):
                harness_loglik = float(response[0][0])
                prefix = len(client.post("/tokenize", json={"prompt": context}).json()["tokens"])
                echoed = client.post("/v1/completions", json={
                    "model": "tiny", "prompt": f"{context} {choice}", "max_tokens": 1, "echo": True,
                    "logprobs": 0, "temperature": 0}).json()["choices"][0]["logprobs"]["token_logprobs"]
                whole = len(client.post("/tokenize", json={"prompt": f"{context} {choice}"}).json()["tokens"])
                assert harness_loglik == pytest.approx(sum(echoed[prefix:whole]), abs=1e-4)
                checked += 1
    assert checked == 8


def test_prefix_cache_reports_cached_tokens(client: httpx.Client) -> None:
    """The served app caches prefixes by default (infra/serve.yaml): a repeated prompt reuses its whole blocks,
    reported as OpenAI's usage.prompt_tokens_details.cached_tokens and in the metrics."""
    prompt = TEXT * 2 + " unique tail for the prefix test"
    count = client.post("/tokenize", json={"prompt": prompt}).json()["count"]
    payload = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0}
    first = client.post("/v1/completions", json=payload).json()
    second = client.post("/v1/completions", json=payload).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (count - 1) // 16 * 16 > 0
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    metrics = client.get("/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("forgeline_prefix_cache_hit_tokens_total ")]
    assert hits and float(hits[0].split()[1]) >= (count - 1) // 16 * 16
    assert client.get("/engine_stats").json()["prefix_cache"]["hits"] >= 1


def test_adapters_are_models_and_mix_in_a_batch(client: httpx.Client) -> None:
    """`model` selects the base or a LoRA adapter (as vLLM's multi-LoRA serving does); requests for different
    adapters decode in one batch and each gets what it gets alone; chats use the stored template."""
    listed = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in listed] == [("tiny", None), ("tiny-a", "tiny"), ("tiny-b", "tiny")]

    def complete(model: str) -> dict:
        response = client.post("/v1/completions", json={"model": model, "prompt": "the cat sat on", "max_tokens": 8,
                                                        "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        return response.json()

    alone = {model: complete(model) for model in ("tiny", "tiny-a", "tiny-b")}
    assert {body["model"] for body in alone.values()} == {"tiny", "tiny-a", "tiny-b"}
    assert len({body["choices"][0]["text"] for body in alone.values()}) == 3, "each adapter answers differently"
    order = ["tiny", "tiny-a", "tiny-b"] * 4
    with ThreadPoolExecutor(len(order)) as pool:
        together = list(pool.map(complete, order))
    assert [b["choices"][0]["text"] for b in together] == [alone[m]["choices"][0]["text"] for m in order]
    chat = client.post("/v1/chat/completions", json={"model": "tiny-a", "max_tokens": 4, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "the cat?"}]}).json()
    assert chat["model"] == "tiny-a"
    prompt = "<|user|>\nthe cat?<|endoftext|><|assistant|>\n"  # the stored chat template
    assert chat["usage"]["prompt_tokens"] == client.post("/tokenize", json={"prompt": prompt}).json()["count"]
    streamed = client.post("/v1/completions", json={"model": "tiny-b", "prompt": "the", "max_tokens": 3,
                                                    "stream": True}).text
    assert '"model": "tiny-b"' in streamed or '"model":"tiny-b"' in streamed


@pytest.mark.parametrize(("path", "payload"), [
    ("/v1/completions", {"model": "other", "prompt": "x"}),
    ("/v1/chat/completions", {"model": "tiny-c", "messages": [{"role": "user", "content": "x"}]}),
])
def test_unknown_model_is_404(client: httpx.Client, path: str, payload: dict) -> None:
    response = client.post(path, json=payload)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'tiny', 'tiny-a', 'tiny-b'" in error["message"]
