"""Grammar-constrained decoding through the engine on the random-weight demo model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.structured.conftest import make_engine, run_all
from winnow.engine.request import GenerationRequest
from winnow.models import LoadedModel
from winnow.sampling.params import SamplingParams
from winnow.structured.spec import GrammarSpec

SEEDS = range(50)
BUDGET = 160  # tokens: far more than any document of SCHEMA needs
# One schema with every feature the acceptance list names; strings and arrays are bounded so
# that a random model's document ends well within BUDGET.
SCHEMA = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer", "minimum": 0, "maximum": 9},
                "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
            },
            "required": ["v", "next"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
        "nick": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]},
        "scores": {
            "type": "array",
            "items": {"type": "number", "minimum": -1, "maximum": 1},
            "minItems": 2,
            "maxItems": 3,
        },
        "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 100},
        "chain": {"$ref": "#/$defs/node"},
    },
    "required": ["color", "code", "nick", "scores", "count", "chain"],
    "additionalProperties": False,
}
SCHEMA_SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA))
PROMPT = [1, 1733, 1117, 29491]


def requests(grammar: GrammarSpec | None, max_tokens: int, **params: object) -> list:
    return [
        GenerationRequest(
            f"seed-{seed}",
            PROMPT,
            SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, **params),
            grammar=grammar,
        )
        for seed in SEEDS
    ]


def is_valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_every_constrained_output_validates_and_ends(loaded: LoadedModel) -> None:
    results = run_all(make_engine(loaded), requests(SCHEMA_SPEC, BUDGET))
    choices = [result[0] for result in results.values()]
    assert [c.finish_reason for c in choices] == ["stop"] * len(SEEDS)
    invalid = [c.text for c in choices if not is_valid(c.text)]
    assert invalid == []
    assert len({c.text for c in choices}) > len(SEEDS) // 2  # really sampled, not one answer


def test_without_the_grammar_nothing_validates(loaded: LoadedModel) -> None:
    results = run_all(make_engine(loaded), requests(None, 24))
    assert sum(is_valid(result[0].text) for result in results.values()) == 0


def test_json_object_outputs_are_objects(loaded: LoadedModel) -> None:
    """Strings in JSON mode are unbounded and a random model rarely closes one, so some
    outputs run to max_tokens; every output that ends is a JSON object."""
    results = run_all(make_engine(loaded), requests(GrammarSpec("json_object"), 24))
    choices = [result[0] for result in results.values()]
    ended = [c for c in choices if c.finish_reason == "stop"]
    assert ended, "no JSON-mode output ended within 24 tokens"
    assert all(isinstance(json.loads(c.text), dict) for c in ended)
    assert all(c.text.startswith("{") for c in choices)


def test_max_tokens_cuts_the_document_and_never_repairs_it(loaded: LoadedModel) -> None:
    results = run_all(make_engine(loaded), requests(SCHEMA_SPEC, 6)[:5])
    for result in results.values():
        choice = result[0]
        assert choice.finish_reason == "length" and len(choice.token_ids) == 6
        assert choice.text.startswith('{"color":"') and not is_valid(choice.text)


def test_the_grammar_wins_over_min_tokens(loaded: LoadedModel) -> None:
    """A finished grammar allows only EOS, which min_tokens would ban: the grammar wins."""
    spec = GrammarSpec("json_schema", json.dumps({"enum": ["yes", "no"]}))
    results = run_all(make_engine(loaded), requests(spec, 40, min_tokens=30)[:4])
    for result in results.values():
        assert result[0].finish_reason == "stop"
        assert json.loads(result[0].text) in ("yes", "no")


def test_n_choices_each_follow_the_grammar(loaded: LoadedModel) -> None:
    request = GenerationRequest(
        "n",
        PROMPT,
        SamplingParams(temperature=1.0, seed=7, n=4, max_tokens=BUDGET),
        grammar=SCHEMA_SPEC,
    )
    choices = run_all(make_engine(loaded), [request])["n"]
    assert sorted(choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "stop" and is_valid(c.text) for c in choices.values())
    assert len({c.text for c in choices.values()}) > 1


def mixed_batch(constrained: bool) -> list[GenerationRequest]:
    """Unconstrained rows of every route, interleaved with rows that have a grammar (or the
    same rows without one)."""
    plain = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=True),
        SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, logprobs=True),
        SamplingParams(temperature=0.8, top_k=40, seed=4, max_tokens=12, min_tokens=12),
        SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True),
    ]
    batch = []
    for i, params in enumerate(plain):
        batch.append(GenerationRequest(f"plain-{i}", PROMPT + [100 + i], params))
        batch.append(
            GenerationRequest(
                f"neighbour-{i}",
                PROMPT + [200 + i],
                SamplingParams(temperature=float(i % 2), seed=i, max_tokens=12, min_tokens=2),
                grammar=SCHEMA_SPEC if constrained else None,
            )
        )
    return batch


def test_unconstrained_rows_are_bit_identical_beside_constrained_ones(
    loaded: LoadedModel,
) -> None:
    with_grammar = run_all(make_engine(loaded), mixed_batch(True))
    without = run_all(make_engine(loaded), mixed_batch(False))
    for i in range(4):
        a, b = with_grammar[f"plain-{i}"][0], without[f"plain-{i}"][0]
        assert (a.token_ids, a.logprobs) == (b.token_ids, b.logprobs)
    assert any(
        with_grammar[f"neighbour-{i}"][0].token_ids != without[f"neighbour-{i}"][0].token_ids
        for i in range(4)
    )


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_constrained_outputs_are_identical(
    loaded: LoadedModel, prefix_caching: bool
) -> None:
    batch = [
        GenerationRequest(
            f"r{i}",
            PROMPT + list(range(3000 + 40 * i, 3040 + 40 * i)),
            SamplingParams(temperature=1.0, seed=i, max_tokens=BUDGET),
            grammar=SCHEMA_SPEC,
        )
        for i in range(6)
    ]
    reference = run_all(make_engine(loaded, enable_prefix_caching=False), batch)
    tight = make_engine(loaded, num_kv_blocks=24, enable_prefix_caching=prefix_caching)
    preempted = run_all(tight, batch)
    assert tight.stats().preemptions > 0
    for request_id, result in reference.items():
        assert preempted[request_id][0].token_ids == result[0].token_ids
        assert is_valid(result[0].text)
