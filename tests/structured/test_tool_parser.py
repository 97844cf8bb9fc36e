"""The incremental tool-call parser: canned outputs in every format, delivered whole, split at
every character boundary, and one character at a time, all give the same reply."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from winnow.structured.tool_formats import ToolFormat, tool_format
from winnow.structured.tool_parser import (
    CallArguments,
    CallOpened,
    ContentText,
    ToolCallParser,
    ToolEvent,
)

SPECIAL_IDS = {"[TOOL_CALLS]": 5, "<|python_tag|>": 128010}
HERMES = tool_format("hermes", SPECIAL_IDS.get)
LLAMA = tool_format("llama3_json", SPECIAL_IDS.get)
MISTRAL = tool_format("mistral", SPECIAL_IDS.get)
MISTRAL_TEXT_OPENER = tool_format("mistral", lambda _: None)

Piece = tuple[str, tuple[int, ...]]


@dataclass
class Reply:
    content: str
    calls: list[tuple[str, str]]  # (name, arguments)


def replay(fmt: ToolFormat, pieces: list[Piece], max_calls: int | None = None) -> Reply:
    """Feed the pieces, check the event framing, and assemble the reply as a client would."""
    parser = ToolCallParser(fmt, max_calls)
    events: list[ToolEvent] = []
    for text, token_ids in pieces:
        events.extend(parser.feed(text, token_ids))
    events.extend(parser.finish())
    content = ""
    calls: list[tuple[str, str]] = []
    ids: set[str] = set()
    for event in events:
        if isinstance(event, ContentText):
            assert event.text
            content += event.text
        elif isinstance(event, CallOpened):
            assert event.index == len(calls), "indices are contiguous from 0"
            assert event.id not in ids
            ids.add(event.id)
            calls.append((event.name, ""))
        else:
            assert isinstance(event, CallArguments)
            assert event.index == len(calls) - 1, "arguments follow their call's opening"
            assert event.fragment
            calls[-1] = (calls[-1][0], calls[-1][1] + event.fragment)
    assert parser.calls == len(calls)
    return Reply(content, calls)


def deliveries(pieces: list[Piece]) -> list[list[Piece]]:
    """The same output whole, split in two at every character, and character by character
    (token ids stay on the first character of their piece)."""
    text_runs = []
    for text, token_ids in pieces:
        chars: list[Piece] = [(char, ()) for char in text] or [("", ())]
        chars[0] = (chars[0][0], token_ids)
        text_runs.append(chars)
    per_char = [char for run in text_runs for char in run]
    ways = [pieces, per_char]
    for cut in range(1, len(per_char)):
        ways.append([_join(per_char[:cut]), _join(per_char[cut:])])
    return ways


def _join(chars: list[Piece]) -> Piece:
    return "".join(text for text, _ in chars), tuple(i for _, ids in chars for i in ids)


def assert_parses(
    fmt: ToolFormat, pieces: list[Piece], expected: Reply, max_calls: int | None = None
) -> None:
    for way in deliveries(pieces):
        assert replay(fmt, way, max_calls) == expected, way


WEATHER = '{"city": "Paris", "unit": "celsius"}'
TRICKY = r'{"text": "a \"quoted\" } </tool_call> ] \\ \u00e9", "n": [1, {"k": null}], "ok": true}'


def hermes_call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        pytest.param(
            "Let me check.\n" + hermes_call("get_weather", WEATHER),
            Reply("Let me check.", [("get_weather", WEATHER)]),
            id="text-then-call",
        ),
        pytest.param(
            hermes_call("get_weather", WEATHER) + "\n" + hermes_call("get_time", "{}"),
            Reply("", [("get_weather", WEATHER), ("get_time", "{}")]),
            id="parallel",
        ),
        pytest.param(
            hermes_call("echo", TRICKY), Reply("", [("echo", TRICKY)]), id="escaped-strings"
        ),
        pytest.param(
            "Use <tools> or <tool_cal wisely.\n",
            Reply("Use <tools> or <tool_cal wisely.\n", []),
            id="partial-opener-is-text",
        ),
        pytest.param(
            "<tool_call>\nnot json\n</tool_call> ok",
            Reply("<tool_call>\nnot json\n</tool_call> ok", []),
            id="opener-without-call-is-text",
        ),
        pytest.param(
            '<tool_call>\n{"nope": 1}\n</tool_call>',
            Reply('<tool_call>\n{"nope": 1}\n</tool_call>', []),
            id="object-without-name-is-text",
        ),
        pytest.param(
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
            Reply("", [("get_weather", '{"city": "Par')]),
            id="truncated-in-arguments",
        ),
        pytest.param(
            '<tool_call>\n{"na', Reply('<tool_call>\n{"na', []), id="truncated-before-name"
        ),
        pytest.param(
            '<tool_call>\n{"arguments": {"a": [1, 2]}, "name": "f"}\n</tool_call>',
            Reply("", [("f", '{"a": [1, 2]}')]),
            id="arguments-before-name",
        ),
        pytest.param(
            '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
            Reply("", [("f", '{"a": 1}')]),
            id="arguments-as-json-string",
        ),
        pytest.param(
            '<tool_call>{"name": "f"}</tool_call> done',
            Reply(" done", [("f", "{}")]),
            id="no-arguments-then-text",
        ),
    ],
)
def test_hermes(output: str, expected: Reply) -> None:
    assert_parses(HERMES, [(output, ())], expected)


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        pytest.param(
            [('{"name": "get_weather", "parameters": ' + WEATHER + "}", ())],
            Reply("", [("get_weather", WEATHER)]),
            id="bare-json",
        ),
        pytest.param(
            [
                (
                    '  {"name": "a", "parameters": {}}; {"name": "b", "parameters": '
                    + TRICKY
                    + "}",
                    (),
                )
            ],
            Reply("", [("a", "{}"), ("b", TRICKY)]),
            id="parallel-bare-json",
        ),
        pytest.param(
            [("", (128010,)), ('{"name": "a", "parameters": {"x": 1}}', ())],
            Reply("", [("a", '{"x": 1}')]),
            id="python-tag-token",
        ),
        pytest.param(
            [('Sure. <|python_tag|>{"name": "a", "arguments": {}}', ())],
            Reply("Sure.", [("a", "{}")]),
            id="python-tag-text",
        ),
        pytest.param(
            [('{"answer": 42} is the reply', ())],
            Reply('{"answer": 42} is the reply', []),
            id="json-that-is-not-a-call",
        ),
        pytest.param(
            [('The call would be {"name": "a", "parameters": {}}', ())],
            Reply('The call would be {"name": "a", "parameters": {}}', []),
            id="json-after-text-is-text",
        ),
        pytest.param(
            [('{"name": "a", "parameters": {"q": "x\\"', ())],
            Reply("", [("a", '{"q": "x\\"')]),
            id="truncated",
        ),
    ],
)
def test_llama3_json(pieces: list[Piece], expected: Reply) -> None:
    assert_parses(LLAMA, pieces, expected)


MISTRAL_CALLS = ' [{"name": "a", "arguments": ' + WEATHER + '}, {"name": "b", "arguments": {}}]'


@pytest.mark.parametrize(
    ("fmt", "pieces", "expected"),
    [
        pytest.param(
            MISTRAL,
            [("", (5,)), (MISTRAL_CALLS, ())],
            Reply("", [("a", WEATHER), ("b", "{}")]),
            id="special-token-opener",
        ),
        pytest.param(
            MISTRAL,
            [("Sure thing.", ()), ("", (5,)), (MISTRAL_CALLS, ())],
            Reply("Sure thing.", [("a", WEATHER), ("b", "{}")]),
            id="text-then-calls",
        ),
        pytest.param(
            MISTRAL,
            [("", (5,)), ('{"name": "a", "arguments": ' + TRICKY + "}", ())],
            Reply("", [("a", TRICKY)]),
            id="single-object-without-list",
        ),
        pytest.param(
            MISTRAL,
            [("", (5,)), ("oops, no calls [here]", ())],
            Reply("oops, no calls [here]", []),
            id="opener-then-text",
        ),
        pytest.param(
            MISTRAL,
            [("The list [1, 2] has {braces}.", ())],
            Reply("The list [1, 2] has {braces}.", []),
            id="brackets-without-opener",
        ),
        pytest.param(
            MISTRAL_TEXT_OPENER,
            [("[TOOL_C", ()), ("ALLS]" + MISTRAL_CALLS, ())],
            Reply("", [("a", WEATHER), ("b", "{}")]),
            id="opener-as-text",
        ),
        pytest.param(
            MISTRAL,
            [("", (5,)), (' [{"name": "a", "arguments": {"city": "Pa', ())],
            Reply("", [("a", '{"city": "Pa')]),
            id="truncated",
        ),
    ],
)
def test_mistral(fmt: ToolFormat, pieces: list[Piece], expected: Reply) -> None:
    assert_parses(fmt, pieces, expected)


def test_one_call_when_parallel_calls_are_off() -> None:
    output = hermes_call("a", "{}") + "\n" + hermes_call("b", WEATHER) + " trailing"
    assert_parses(HERMES, [(output, ())], Reply("", [("a", "{}")]), max_calls=1)


def test_streamed_arguments_arrive_piece_by_piece() -> None:
    """Arguments are not held back until the call ends: each piece comes out as it arrives."""
    parser = ToolCallParser(HERMES)
    opened = parser.feed('<tool_call>\n{"name": "f", "arguments": {"a": ')
    assert [type(event) for event in opened] == [CallOpened, CallArguments]
    assert parser.feed("1") == [CallArguments(0, "1")]
    assert parser.feed("}}\n</tool_call>") == [CallArguments(0, "}")]
    assert parser.finish() == []


@pytest.mark.parametrize("fmt", [HERMES, LLAMA, MISTRAL])
def test_ids(fmt: ToolFormat) -> None:
    ids = {fmt.new_call_id() for _ in range(50)}
    assert len(ids) == 50
    for call_id in ids:
        if fmt.short_ids:
            assert len(call_id) == 9 and call_id.isalnum()
        else:
            assert call_id.startswith("call_") and call_id[5:].isalnum()


@pytest.mark.parametrize("fmt", [HERMES, LLAMA, MISTRAL_TEXT_OPENER])
def test_rendered_calls_parse_back(fmt: ToolFormat) -> None:
    """What a format writes for earlier turns is what its parser reads."""
    calls = [("a", WEATHER), ("b", json.dumps({"x": [1, "two"]}))]
    assert replay(fmt, [(fmt.render_calls(calls), ())]) == Reply("", calls)
