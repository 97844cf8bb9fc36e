"""Forced tool-call grammars, checked with llguidance directly on the demo model's tokenizer:
they compile, accept the format's own calls, refuse anything else, and a random walk through
them always yields calls that validate against the tools' schemas."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import llguidance
import llguidance.hf
import numpy as np
import pytest

from winnow.models.tokenizer import Tokenizer
from winnow.structured.tool_formats import TOOL_FORMAT_NAMES, FunctionSpec, ToolFormat, tool_format
from winnow.structured.tool_grammar import forced_call_grammar
from winnow.structured.tool_parser import CallArguments, CallOpened, ToolCallParser

WEATHER = FunctionSpec(
    "get_weather",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
CLOCK = FunctionSpec("get_time")  # no parameters: takes an empty object
# additionalProperties left out: only the declared parameters are admitted all the same
CALENDAR_PARAMETERS = {"type": "object", "properties": {"day": {"type": "integer"}}}
CALENDAR = FunctionSpec("get_date", CALENDAR_PARAMETERS)
FUNCTIONS = [WEATHER, CLOCK, CALENDAR]
SCHEMAS = {
    "get_weather": WEATHER.parameters,
    "get_time": {"type": "object", "additionalProperties": False},
    "get_date": {**CALENDAR_PARAMETERS, "additionalProperties": False},
}


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    return llguidance.hf.from_tokenizer(tokenizer.hf)


def formats(tokenizer: Tokenizer) -> list[ToolFormat]:
    return [tool_format(name, tokenizer.special_token_id) for name in TOOL_FORMAT_NAMES]


def matcher(
    ll_tokenizer: llguidance.LLTokenizer,
    fmt: ToolFormat,
    functions: list[FunctionSpec],
    parallel: bool,
) -> llguidance.LLMatcher:
    spec = forced_call_grammar(fmt, functions, parallel=parallel)
    assert spec.kind == "lark"
    grammar = llguidance.LLMatcher.grammar_from_lark(spec.source)
    assert llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer) == ""
    built = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    assert not built.is_error(), built.get_error()
    return built


def tokens_of(ll_tokenizer: llguidance.LLTokenizer, fmt: ToolFormat, text: str) -> list[int]:
    """Token ids of an output; the Mistral opener is its special token, as a model writes it."""
    if fmt.opener_token_id is not None and text.startswith(fmt.opener):
        return [fmt.opener_token_id, *ll_tokenizer.tokenize_str(text[len(fmt.opener) :])]
    return ll_tokenizer.tokenize_str(text)


def accepts(m: llguidance.LLMatcher, tokens: list[int]) -> bool:
    m.reset()
    return m.consume_tokens(tokens) and m.is_accepting()


WEATHER_ARGS = '{"city": "Oslo", "unit": "celsius"}'


def test_each_format_accepts_its_own_calls(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    for fmt in formats(tokenizer):
        one = fmt.render_calls([("get_weather", WEATHER_ARGS)])
        two = fmt.render_calls([("get_weather", WEATHER_ARGS), ("get_time", "{}")])
        parallel = matcher(ll_tokenizer, fmt, FUNCTIONS, parallel=True)
        single = matcher(ll_tokenizer, fmt, FUNCTIONS, parallel=False)
        assert accepts(parallel, tokens_of(ll_tokenizer, fmt, one)), fmt.name
        assert accepts(parallel, tokens_of(ll_tokenizer, fmt, two)), fmt.name
        assert accepts(single, tokens_of(ll_tokenizer, fmt, one)), fmt.name
        assert not accepts(single, tokens_of(ll_tokenizer, fmt, two)), fmt.name


@pytest.mark.parametrize(
    "calls",
    [
        pytest.param([("get_wether", WEATHER_ARGS)], id="unknown-name"),
        pytest.param([("get_weather", '{"city": "Oslo", "unit": "kelvin"}')], id="enum"),
        pytest.param([("get_weather", '{"city": "Oslo"}')], id="missing-required"),
        pytest.param(
            [("get_weather", '{"city": "Oslo-by-the-sea", "unit": "celsius"}')], id="maxLength"
        ),
        pytest.param([("get_weather", WEATHER_ARGS[:-1] + ', "x": 1}')], id="additionalProperties"),
        pytest.param([("get_weather", '{"city": "Oslo",  "unit": "celsius"}')], id="padding"),
        pytest.param([("get_time", '{"a": 1}')], id="arguments-to-a-parameterless-function"),
        pytest.param([("get_date", '{"day": 1, "x": 2}')], id="undeclared-parameter"),
    ],
)
def test_invalid_calls_are_refused(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer, calls: list[tuple[str, str]]
) -> None:
    for fmt in formats(tokenizer):
        m = matcher(ll_tokenizer, fmt, FUNCTIONS, parallel=True)
        assert not accepts(m, tokens_of(ll_tokenizer, fmt, fmt.render_calls(calls))), fmt.name


def test_text_before_the_call_is_refused(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    for fmt in formats(tokenizer):
        m = matcher(ll_tokenizer, fmt, FUNCTIONS, parallel=True)
        text = "Sure. " + fmt.render_calls([("get_weather", WEATHER_ARGS)])
        assert not accepts(m, ll_tokenizer.tokenize_str(text)), fmt.name


def test_named_function_grammar_allows_only_that_function(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    for fmt in formats(tokenizer):
        m = matcher(ll_tokenizer, fmt, [CLOCK], parallel=False)
        assert accepts(m, tokens_of(ll_tokenizer, fmt, fmt.render_calls([("get_time", "{}")])))
        weather = fmt.render_calls([("get_weather", WEATHER_ARGS)])
        assert not accepts(m, tokens_of(ll_tokenizer, fmt, weather))


def random_walk(
    m: llguidance.LLMatcher, rng: random.Random, eos: int, vocab_size: int, budget: int
) -> list[int]:
    """Tokens drawn uniformly from whatever the grammar allows, until it allows nothing else or
    the walk draws EOS."""
    m.reset()
    out: list[int] = []
    while len(out) < budget and not m.is_stopped():
        bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        token = int(rng.choice(np.flatnonzero(bits[:vocab_size])))
        if token == eos:
            break
        assert m.consume_token(token)
        out.append(token)
    return out


@pytest.mark.parametrize("parallel", [True, False])
def test_random_walks_are_valid_calls(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer, parallel: bool
) -> None:
    rng = random.Random(11)
    eos = tokenizer.eos_token_ids[0]
    for fmt in formats(tokenizer):
        m = matcher(ll_tokenizer, fmt, FUNCTIONS, parallel=parallel)
        for _ in range(4):
            tokens = random_walk(m, rng, eos, tokenizer.vocab_size, budget=400)
            assert m.is_accepting(), (fmt.name, tokenizer.decode(tokens, skip_special_tokens=False))
            parser = ToolCallParser(fmt)
            events = parser.feed(tokenizer.decode(tokens), tokens) + parser.finish()
            names = [event.name for event in events if isinstance(event, CallOpened)]
            assert len(names) >= 1 and (parallel or len(names) == 1)
            arguments = [""] * len(names)
            for event in events:
                if isinstance(event, CallArguments):
                    arguments[event.index] += event.fragment
            for name, text in zip(names, arguments, strict=True):
                jsonschema.validate(json.loads(text), SCHEMAS[name])
