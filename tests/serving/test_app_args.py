"""The Serve application's typed arguments: what `infra/serve.yaml` and `forgeline serve` may set."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.app import ServeArgs, app_builder


def test_defaults_and_types() -> None:
    args = ServeArgs.model_validate({"model": "runs/x", "engine_cpus": "2", "dtype": "bfloat16"})
    assert (args.engine_cpus, args.dtype, args.max_batch, args.request_timeout_s) == (2.0, "bfloat16", 64, 60.0)
    assert (args.max_ongoing_requests, args.prefix_cache_mb, args.max_pending_requests) == (128, 256.0, 256)
    assert (args.engine_threads, args.engine_prepack, args.engine_allocator) == (None, True, "auto")


@pytest.mark.parametrize("allocator", ["libtcmalloc.so", "tcmalloc", ""])
def test_an_engine_allocator_that_is_no_setting_or_absolute_path_names_the_field(allocator: str) -> None:
    with pytest.raises(ValidationError, match="engine_allocator"):
        ServeArgs.model_validate({"model": "m", "engine_allocator": allocator})
    assert ServeArgs.model_validate({"model": "m", "engine_allocator": "/usr/lib/libx.so"}).engine_allocator


@pytest.mark.parametrize(("args", "field"), [
    ({"model": "m", "max_batch": 0}, "max_batch"),
    ({"model": "m", "dtype": "float16"}, "dtype"),
    ({"model": "m", "request_timeout_s": -1}, "request_timeout_s"),
    ({"model": "m", "max_batchh": 8}, "max_batchh"),
    ({"name": "m"}, "model"),
])
def test_bad_arguments_name_the_field(args: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        app_builder(args)  # type: ignore[arg-type]  (a mapping, as `serve run` passes before validation)
    assert [error["loc"][0] for error in caught.value.errors()] == [field]


def test_field_errors_survive_pickling_with_their_field() -> None:
    """A replica's bad-request error crosses Ray as itself (a 400 naming the field), not as a 500."""
    import pickle

    from dataprep.rag.retriever import RetrievalError
    from serving.sampling import RequestError

    for error in (RequestError("prompt", "the prompt is empty"), RetrievalError("k", "k must be at least 1")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and again.param == error.param and str(again) == str(error)
