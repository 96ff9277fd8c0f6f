"""Property-based fuzzing of the served OpenAPI schema (schemathesis strategies, driven by Hypothesis): cases built
from the schema — valid and invalid bodies — against a real `bigmodel serve`; no input may produce a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from bigmodel import api
from bigmodel.config import validate_recipe
from conftest import ServerProcess, tiny_recipe, train_lm_fixture_run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    api.train(validate_recipe(tiny_recipe()), out=d / "run", progress=False)
    s = ServerProcess(d / "run")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    s = ServerProcess(train_lm_fixture_run(tmp_path_factory.mktemp("fuzzlm")), "--max-new-tokens", "48")
    yield s
    s.stop()


def test_no_server_errors(server):
    fuzz(
        server,
        {"POST /v1/predict", "GET /healthz", "POST /v1/generate", "POST /v1/translate", "POST /v1/explain"},
        60,
    )


def test_no_server_errors_from_a_language_model(lm_server):
    seen = fuzz(lm_server, {"POST /v1/generate"}, 30, only="/v1/generate")
    assert 413 in seen  # max_new_tokens over the server's limit


def fuzz(server, expected: set[str], examples: int, only: str | None = None) -> dict[int, int]:
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= expected
    if only is not None:
        operations = [op for op in operations if op.path == only]
    seen: dict[int, int] = {}

    def check(case):
        response = case.call(base_url=server.url, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

    for op in operations:
        # A GET without parameters has nothing to make invalid: negative cases exist only for the POST body.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.method.upper() == "POST" else [])
        for mode in modes:
            strategy = op.as_strategy(generation_mode=mode)
            settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)(
                given(case=strategy)(check)
            )()
    assert 422 in seen and 200 in seen  # both rejected and accepted inputs were exercised
    return seen
