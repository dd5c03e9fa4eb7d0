"""Schema-driven fuzzing of every route over the in-process app (a tiny random model, so each
generated request is cheap): no 5xx, and every 4xx carries OpenAI's error body."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from conftest import tiny_engine  # noqa: E402
from service.app import ServerSettings, State, create_app  # noqa: E402


@pytest.fixture(scope="module")
def app_schema(default_checkpoint):
    engine = tiny_engine(default_checkpoint, slots=4, max_queue=64)
    app = create_app(State(ServerSettings(model_name="tiny"), engine))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.stop()


def test_no_server_errors_and_openai_error_bodies(app_schema):
    from hypothesis import given

    checked = []
    for result in app_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call()
            assert response.status_code < 500, (case.path, case.body, response.text[:500])
            if 400 <= response.status_code < 500:
                body = response.json()
                assert set(body) == {"error"}, body
                assert isinstance(body["error"]["message"], str) and body["error"]["type"]

        run()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/chat/interactive",
            "GET /v1/models", "POST /v1/tokenize"} <= set(checked)
