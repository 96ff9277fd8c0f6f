"""Property-based fuzzing of the served OpenAPI schema (schemathesis strategies, driven by Hypothesis): cases built
from the schema — valid and invalid bodies — against a real `bigmodel serve`; no input may produce a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from bigmodel import api
from bigmodel.config import validate_recipe
from conftest import ServerProcess, tiny_recipe


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    api.train(validate_recipe(tiny_recipe()), out=d / "run", progress=False)
    s = ServerProcess(d / "run")
    yield s
    s.stop()


def test_no_server_errors(server):
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/predict", "GET /healthz"}
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
            settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)(
                given(case=strategy)(check)
            )()
    assert 422 in seen and 200 in seen  # both rejected and accepted inputs were exercised
