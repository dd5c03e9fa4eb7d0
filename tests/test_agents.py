"""Agent libraries against the live server: openai-agents' ``Agent`` with a function tool and
an ``output_type`` sends ``tools`` and a response format in each request (``text.format`` on
Responses, ``response_format`` on chat). Run to its end through both of its model classes: a
tool call, the tool's result, then a final answer that parses as the output type.

The bundled 135M model, left to itself, calls the tool again on every turn; a logit bias on
"{" (which a Hermes call never starts with) steers the turn after the result to the format's
branch. The first turn's call is required by ``tool_choice``, as an agent may set it."""

from typing import Literal

import pytest

from conftest import start_server

agents = pytest.importorskip("agents")
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def long_server(default_checkpoint, tmp_path_factory):
    proc, url = start_server(tmp_path_factory.mktemp("agents") / "server.log", "--session-len", "1024")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_an_agent_with_a_tool_and_an_output_type_runs_to_its_answer_on_both_apis(long_server, default_checkpoint):
    from openai import AsyncOpenAI
    from pydantic import BaseModel

    from model.tokenizer import Tokenizer

    class Weather(BaseModel):
        sunny: bool

    calls = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Get the weather of a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    (brace,) = Tokenizer.from_dir(default_checkpoint).encode("{", add_special_tokens=False)
    agents.set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=long_server + "/v1", api_key="unused")
    settings = agents.ModelSettings(temperature=0, max_tokens=120, tool_choice="required",
                                    extra_body={"logit_bias": {str(brace): 100}})
    for model in (agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
                  agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client)):
        calls.clear()
        agent = agents.Agent(name="weather", instructions="Answer about the weather.", tools=[get_weather],
                             output_type=Weather, model=model, model_settings=settings)
        result = agents.Runner.run_sync(agent, "Is it sunny in Paris?", max_turns=4)
        assert isinstance(result.final_output, Weather), type(model).__name__
        assert calls and calls[0] in ("Paris", "Rome")
        kinds = [item.type for item in result.new_items]
        assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"


def test_a_pydantic_ai_agent_with_a_tool_and_native_output_finishes_on_both_apis(long_server, default_checkpoint):
    """pydantic-ai's native output sends ``tools`` with a JSON-schema format in one request; a
    logit bias on "{" has the model answer in the format at once."""
    pai = pytest.importorskip("pydantic_ai")
    from pydantic import BaseModel
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    from model.tokenizer import Tokenizer

    class Weather(BaseModel):
        sunny: bool

    (brace,) = Tokenizer.from_dir(default_checkpoint).encode("{", add_special_tokens=False)
    for kind in (OpenAIChatModel, OpenAIResponsesModel):
        model = kind(MODEL, provider=OpenAIProvider(base_url=long_server + "/v1", api_key="unused"))
        agent = pai.Agent(model, output_type=pai.NativeOutput(Weather), instructions="Answer about the weather.",
                          model_settings={"temperature": 0, "max_tokens": 120,
                                          "extra_body": {"logit_bias": {str(brace): 100}}})

        @agent.tool_plain
        def get_weather(city: Literal["Paris", "Rome"]) -> str:
            """Get the weather of a city."""
            return f"It is sunny in {city}."

        result = agent.run_sync("Is it sunny in Paris?")
        assert isinstance(result.output, Weather), kind.__name__
