"""Schema-driven fuzzing of every route over the in-process app (a tiny random model, so each
generated request is cheap): no 5xx, and every 4xx carries OpenAI's error body."""

import msgspec
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from conftest import tiny_engine  # noqa: E402
from service.app import ServerSettings, State, create_app  # noqa: E402


@pytest.fixture(scope="module")
def app(default_checkpoint):
    # Warmed up: a case's request must not wait out its 10 s timeout for the first compile.
    engine = tiny_engine(default_checkpoint, slots=4, max_queue=64, warmup=True)
    yield create_app(State(ServerSettings(model_name="tiny"), engine))
    engine.stop()


@pytest.fixture(scope="module")
def app_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


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
                # Anthropic's routes answer with Anthropic's body, the rest with OpenAI's.
                assert set(body) == ({"type", "error"} if case.path.startswith("/v1/messages") else {"error"}), body
                assert isinstance(body["error"]["message"], str) and body["error"]["type"]

        run()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/chat/interactive",
            "GET /v1/models", "POST /v1/tokenize", "POST /v1/responses", "GET /v1/responses/{response_id}",
            "POST /v1/messages", "POST /v1/embeddings"} <= set(checked)


def _wrong_value(schema: dict, spec: dict):
    """A JSON value no branch of ``schema`` accepts (None when any value is fine)."""
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    kinds = set()
    for branch in schema.get("oneOf", schema.get("anyOf", [schema])):
        while "$ref" in branch:
            branch = spec["components"]["schemas"][branch["$ref"].rsplit("/", 1)[-1]]
        kinds.add(branch.get("type", "object" if "properties" in branch else None))
    if None in kinds:
        return None
    for value, kind in (({"wrong": True}, "object"), ([{"wrong": True}], "array"), ("wrong", "string"),
                        (True, "boolean")):
        if kind not in kinds and not (kind == "boolean" and kinds & {"integer", "number"}):
            return value
    return None


def test_malformed_bodies_are_400_with_openai_errors(app):
    """Bodies no schema accepts: nesting 100k levels deep, numbers past float and int64 range,
    NaN and Infinity, invalid UTF-8, and a value of the wrong type in every field of every
    POST route. Each gets a 400 with OpenAI's error body, never a 5xx."""
    from litestar.testing import TestClient

    spec = app.openapi_schema.to_schema()
    base = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            "/v1/completions": {"prompt": "hi", "max_tokens": 2},
            "/v1/chat/interactive": {"prompt": "hi", "request_output_len": 2},
            "/v1/tokenize": {"prompt": "hi"}, "/v1/detokenize": {"tokens": [1]}, "/v1/encode": {"input": "hi"},
            "/v1/responses": {"input": "hi", "max_output_tokens": 2},
            "/v1/messages": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            "/v1/messages/count_tokens": {"messages": [{"role": "user", "content": "hi"}]}}
    raw = [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
           b'{"temperature": 1e400}', b'{"seed": 123456789012345678901234567890}', b'{"temperature": NaN}',
           b'{"temperature": Infinity}', b'{"prompt": "\xff\xfe"}', b"\xff\xfe\x00{"]
    checked = 0
    with TestClient(app) as c:
        for path, good in base.items():
            assert c.post(path, json=good).status_code == 200, path
            bodies = [(None, body) for body in raw]
            schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            name = schema["$ref"].rsplit("/", 1)[-1]
            for field, prop in spec["components"]["schemas"][name]["properties"].items():
                wrong = _wrong_value(prop, spec)
                if wrong is not None:
                    bodies.append((field, msgspec.json.encode({**good, field: wrong})))
            for field, body in bodies:
                r = c.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 400, (path, field, body[:80], r.status_code, r.text[:300])
                error = r.json()["error"]
                assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"
                checked += 1
    assert checked > 60, checked
