"""Tool calls in a model's own template syntax: the default model's weights with a
chat template that renders tools and writes calls in Hermes' ``<tool_call>`` tags
(as Qwen 2.5's and Hermes 3's do; tests/templates/hermes_tools.jinja). The template
gets the tools and the history; ``required`` and named calls are held by a grammar
from the first token, ``auto`` calls by llama.cpp's lazy grammar once the model
writes ``<tool_call>``."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gguf_files import with_template
from test_tools import TOOLS, _valid, forced_call_problems

from conftest import MODEL, Daemon

TEMPLATE = Path(__file__).parent / "templates" / "hermes_tools.jinja"
HERMES = "smollm2-hermes"
AS_GENERIC = "smollm2-hermes-generic"  # the same file, tool_format = "generic"
WEATHER = [TOOLS[0]]
CASES = [9, 14]  # odd: named and streamed; even: required


@pytest.fixture(scope="module")
def hermes_file(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Path:
    return with_template(
        model_file, tmp_path_factory.mktemp("hermes") / "hermes.gguf", TEMPLATE.read_text()
    )


@pytest.fixture(scope="module")
def hermes(tmp_path_factory: pytest.TempPathFactory, hermes_file: Path) -> Iterator[Daemon]:
    d = Daemon(
        tmp_path_factory.mktemp("hermes-daemon"),
        hermes_file,
        names=(HERMES, AS_GENERIC),
        default_model=HERMES,
        model_settings={AS_GENERIC: {"tool_format": "generic"}},
    ).start()
    yield d
    if d.alive():
        d.stop(signal.SIGKILL)


def test_the_format_follows_the_template_unless_a_setting_chooses(
    hermes: Daemon, daemon: Daemon
) -> None:
    with hermes.http() as h:
        own = h.get(f"/api/models/{HERMES}").json()
        chosen = h.get(f"/api/models/{AS_GENERIC}").json()
    with daemon.http() as h:
        plain = h.get(f"/api/models/{MODEL}").json()
    assert own["tool_format"] == "hermes" and own["tool_syntax"] == "hermes"
    assert "tools" in own["capabilities"]
    assert chosen["tool_format"] == "generic" and chosen["tool_syntax"] == "hermes"
    assert plain["tool_format"] == "generic" and plain["tool_syntax"] == ""


def test_the_template_renders_the_tools_and_the_history(hermes_file: Path) -> None:
    """The prompt, as the model's own template writes it: the tools in its <tools>
    list, the earlier call in its <tool_call> tags, the result in <tool_response>."""
    from edgellm.runtime.llama import tool_format
    from edgellm.runtime.llama.chat_template import TemplateRenderer
    from edgellm.runtime.types import Tool, ToolUse

    use = ToolUse(
        (Tool("get_weather", "Weather now", TOOLS[0]["function"]["parameters"]),),
        format="hermes",
    )
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 C"},
    ]
    messages, variables = tool_format.prompt(history, use)
    renderer = TemplateRenderer(TEMPLATE.read_text(), bos="", eos="<|im_end|>")
    try:
        prompt = renderer.render(messages, **variables)
    finally:
        renderer.close()
    listed = prompt.split("<tools>\n", 1)[1].split("</tools>", 1)[0]
    assert '"name": "get_weather"' in listed and '"description": "Weather now"' in listed
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n' in prompt
    assert "<tool_response>\nSunny, 21 C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_every_call_in_the_templates_syntax_validates(hermes: Daemon) -> None:
    """Two of test_tools' tools (a nested object, named and streamed; a reference,
    required), each forced in turn, as n=3 choices (three seeds): by name
    beside another and streamed, or alone and "required". Each call names the tool
    and validates. (All fifteen, in the generic format, are in test_tools; the
    grammar of the arguments is the same in both formats.)"""
    sdk = hermes.openai()
    failures = [p for i in CASES for p in forced_call_problems(sdk, HERMES, i, seed=5 * i)]
    assert failures == []


def test_auto_calls_begin_when_the_model_writes_the_tag(hermes: Daemon) -> None:
    """``auto``: free text until the model writes <tool_call>, then the lazy grammar
    holds the call. A bias toward "<" makes this small model begin calls on some
    seeds; every answer is text or valid calls, and some are calls."""
    with hermes.http() as h:
        lt = h.post("/tokenize", json={"model": HERMES, "content": "<"}).json()["tokens"]
    assert len(lt) == 1
    sdk = hermes.openai()
    kinds = []
    for seed in range(4):
        r = sdk.chat.completions.create(
            model=HERMES,
            messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
            tools=WEATHER,
            max_tokens=60,
            seed=seed,
            logit_bias={str(lt[0]): 5},
        )
        c = r.choices[0]
        kinds.append(c.finish_reason)
        if c.finish_reason == "tool_calls":
            for t in c.message.tool_calls or []:
                assert _valid(t.function.name, t.function.arguments, {"get_weather"}) is None
        else:
            assert c.message.tool_calls is None and c.message.content
    assert "tool_calls" in kinds, kinds


def test_the_loop_goes_on_in_the_templates_syntax(hermes: Daemon) -> None:
    sdk = hermes.openai()
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = sdk.chat.completions.create(
        model=HERMES,
        messages=messages,
        tools=WEATHER,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "get_weather"
    messages += [
        first.choices[0].message,
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    final = sdk.chat.completions.create(
        model=HERMES, messages=messages, tools=WEATHER, max_tokens=60, temperature=0
    )
    c = final.choices[0]  # this small model, with a template it was not trained on, is
    # no judge of what comes next: the turn renders and is answered in text or a call
    assert final.usage is not None and first.usage is not None
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 20  # call and result
    if c.finish_reason == "tool_calls":
        for t in c.message.tool_calls or []:
            assert _valid(t.function.name, t.function.arguments, {"get_weather"}) is None
    else:
        assert c.message.content and c.message.tool_calls is None
    # "none": the template still describes the tools; nothing is read as a call
    none = sdk.chat.completions.create(
        model=HERMES, messages=messages, tools=WEATHER, tool_choice="none", max_tokens=30
    )
    assert none.choices[0].message.tool_calls is None


def test_a_token_that_would_overrun_the_trigger_is_never_chosen(model_file: Path) -> None:
    """llama.cpp feeds a lazy grammar the text from its trigger on, and a grammar that
    cannot take it ends the process. After "<tool_call" the model is pushed to '>"'
    (the tag and a quote the grammar cannot take): another token is chosen instead,
    and the grammar goes on."""
    from edgellm.config import ModelSettings
    from edgellm.runtime.llama.backend import LlamaBackend
    from edgellm.runtime.llama.tool_hermes import constraint
    from edgellm.runtime.types import Sampling, Tool, ToolUse

    llm = LlamaBackend(str(model_file), ModelSettings(n_threads=2), 256, 1)
    try:
        (overrun,) = llm.tokenize('>"', False)
        (tag_end,) = llm.tokenize(">", False)
        held = constraint(ToolUse((Tool("get_weather", "", WEATHER[0]["function"]["parameters"]),)))
        assert held is not None and held.trigger == "<tool_call>"
        # greedy, '>"' first and '>' second: the guard leaves out the one, takes the other
        p = Sampling(temperature=0, logit_bias={overrun: 100, tag_end: 90})
        sampler = llm.sampler(p, 0, held.grammar, trigger=held.trigger)
        tokens = llm.tokenize("Call the tool: ", True)
        for token in llm.tokenize("<tool_call", False):  # as if sampled: both see it
            llm._c.llama_sampler_accept(sampler.grammar, token)
            sampler.trigger.accept(token)
            tokens.append(token)
        chosen = []
        for _ in range(3):
            assert llm.decode([(t, i, 0, i == len(tokens) - 1) for i, t in enumerate(tokens)]) == 0
            llm.seq_keep_prefix(0, 0)
            chosen.append(llm.sample(sampler, len(tokens) - 1))
            tokens.append(chosen[-1])
        assert chosen[0] == tag_end and sampler.trigger.fired
        # then the grammar holds: a space or newline or the call's "{"
        after = llm.detokenize(chosen[1:])
        assert after.lstrip(" \n")[:1] in ("{", ""), after
        assert overrun not in chosen
        sampler.close()
    finally:
        llm.close()


def test_the_parser_reads_text_then_calls_however_the_text_is_cut() -> None:
    """Text before the tag passes on (but for what may begin the tag), then each call's
    id and name, then its arguments, as the generic format's; one character at a time
    or all at once alike. And parallel calls compile into one grammar."""
    from edgellm.runtime.llama.tool_hermes import HermesParser, constraint
    from edgellm.runtime.types import Tool, ToolCallDelta, ToolUse

    answer = (
        'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"x": "}"}}}\n'
        "</tool_call>"
    )
    for step in (1, 3, len(answer)):
        parser = HermesParser()
        parts = [p for i in range(0, len(answer), step) for p in parser.feed(answer[i : i + step])]
        parts += parser.flush()
        text = "".join(p for p in parts if isinstance(p, str))
        calls: dict[int, list[str]] = {}
        for p in parts:
            if isinstance(p, ToolCallDelta):
                calls.setdefault(p.index, []).append(p.name or p.arguments)
        assert text == "Let me check. "
        assert {i: (c[0], "".join(c[1:])) for i, c in calls.items()} == {
            0: ("get_weather", '{"city": "Oslo"}'),
            1: ("add", '{"a": 1, "b": {"x": "}"}}'),
        }
    plain = HermesParser()
    assert plain.feed("No call <tool") == ["No call "] and plain.flush() == ["<tool"]
    two = ToolUse((Tool("a"), Tool("b")), "required", parallel=True)
    held = constraint(two)
    assert held is not None and "(tool-call-ws tool-call)*" in held.grammar
