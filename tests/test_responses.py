"""OpenAI's Responses API, stateless, proven with the openai SDK's client.responses
(streamed and not, a json_schema text.format through parse(), a function tool) and
with the OpenAI Agents SDK running an agent with one tool to its final answer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import MODEL, Daemon

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather now",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_create_streamed_and_not(daemon: Daemon) -> None:
    sdk = daemon.openai()
    r = sdk.responses.create(
        model=MODEL,
        instructions="Answer in one short sentence.",
        input="Name a colour.",
        max_output_tokens=16,
        temperature=0,
    )
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.usage is not None and r.usage.output_tokens > 0 and r.id.startswith("resp_")
    with sdk.responses.stream(
        model=MODEL,
        instructions="Answer in one short sentence.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}],
        max_output_tokens=16,
        temperature=0,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == r.output_text  # the same prompt, greedy: the same answer
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")


class Colour(BaseModel):
    name: str = Field(max_length=20)
    warm: bool


def test_parse_with_a_json_schema_text_format(daemon: Daemon) -> None:
    sdk = daemon.openai()
    r = sdk.responses.parse(
        model=MODEL,
        input="Describe a colour as JSON.",
        text_format=Colour,
        max_output_tokens=80,
        extra_body={"temperature": 0.7, "seed": 1},
    )
    assert isinstance(r.output_parsed, Colour)


def test_a_function_tool_call_and_its_output(daemon: Daemon) -> None:
    sdk = daemon.openai()
    r = sdk.responses.create(
        model=MODEL,
        input="What is the weather in Oslo?",
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_output_tokens=60,
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    # streamed: the arguments arrive as deltas and add up to the call
    with sdk.responses.stream(
        model=MODEL,
        input="What is the weather in Oslo?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        temperature=0,
        max_output_tokens=60,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    streamed = [item for item in final.output if item.type == "function_call"]
    assert "".join(deltas) == streamed[0].arguments == calls[0].arguments
    # the result goes back as a function_call_output item, and the model answers
    follow = sdk.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Oslo?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"},
        ],
        tools=[WEATHER],
        temperature=0,
        max_output_tokens=60,
    )
    assert follow.status in ("completed", "incomplete")


def test_the_agents_sdk_runs_an_agent_with_one_tool(daemon: Daemon) -> None:
    """The OpenAI Agents SDK's default model is the Responses API: an agent with one
    function tool, run to its final output: the tool is called once (tool_choice
    required on the first turn only, as the SDK's reset does), then the answer."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        RunConfig,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    called: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        called.append(city)
        return f"Sunny, 21 C in {city}"

    client = openai.AsyncOpenAI(
        base_url="http://edgellm/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(daemon.socket))),
    )
    agent = Agent(
        name="weather",
        instructions="Use get_weather, then say what it returned.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model=MODEL, openai_client=client),
        # seeded (edgellm's seed, through extra_body): with its 135M model, 2 of 8 seeds
        # reach an answer; the rest call the tool again each turn (README: tool calls)
        model_settings=ModelSettings(
            tool_choice="required", temperature=0.7, max_tokens=60, extra_body={"seed": 2}
        ),
        reset_tool_choice=True,
    )

    async def run() -> Any:
        return await Runner.run(
            agent, "What is the weather in Oslo?", max_turns=4, run_config=RunConfig()
        )

    result = asyncio.run(run())
    assert called == ["Oslo"] and "21" in str(result.final_output)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"input": "x", "store": True}, "store"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
        ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0].type",
        ),
        (
            {
                "input": "x",
                "text": {
                    "format": {
                        "type": "json_schema",
                        "name": "x",
                        "schema": {"type": "object", "not": {}},
                    }
                },
            },
            "text.format.schema.not",
        ),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "frequency": 1}, "frequency"),
        (
            {
                "input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}],
                "tools": [WEATHER],
            },
            "input[0].tool_call_id",
        ),
    ],
)
def test_what_it_cannot_honour_is_refused_by_name(
    daemon: Daemon, body: dict[str, Any], param: str
) -> None:
    with daemon.http() as h:
        r = h.post("/v1/responses", json={"model": MODEL, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
        assert h.get("/health").status_code == 200
