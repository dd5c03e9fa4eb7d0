"""Schema-driven fuzzing of every route over the in-process app (a tiny random model, so each
generated request is cheap): no 5xx, and every 4xx carries OpenAI's error body."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from model.weights import init_params  # noqa: E402
from service.app import ServerSettings, State, create_app  # noqa: E402
from service.engine import Engine  # noqa: E402
from service.runner import ModelRunner  # noqa: E402


@pytest.fixture(scope="module")
def app_schema(default_checkpoint):
    tokenizer = Tokenizer.from_dir(default_checkpoint)
    cfg = ModelConfig(family="llama", vocab_size=tokenizer.vocab_size, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    runner = ModelRunner(cfg, init_params(cfg, seed=0), max_batch_size=4, session_len=128,
                         eos_ids=tokenizer.eos_ids, max_prefill_chunk=32)
    engine = Engine(runner, tokenizer, max_queue=64)
    engine.start()
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
