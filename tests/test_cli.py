"""`winnow serve`'s command line: vLLM's flags with vLLM's meaning, WINNOW_* variables, refusals."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from winnow.cli import SERVE_CONFIGS, build_parser, main, serve_configs
from winnow.config import EngineConfig, ServerConfig, VllmCompatibility
from winnow.flags import Option, env_name, options, read_flags

ALL_OPTIONS = [option for config in SERVE_CONFIGS.values() for option in options(config)]


@pytest.fixture(autouse=True)
def no_winnow_flags_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for option in ALL_OPTIONS:
        monkeypatch.delenv(option.env, raising=False)


def parse(*argv: str) -> tuple[VllmCompatibility, EngineConfig, ServerConfig]:
    parser, serve = build_parser()
    args = parser.parse_args(["serve", *argv])
    engine, server = serve_configs(args, serve)
    return read_flags(serve, args, VllmCompatibility), engine, server


def refusal(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_every_flag_has_help() -> None:
    parser, serve = build_parser()
    options_shown = [action for action in serve._actions if action.option_strings]
    assert len(options_shown) == len(ALL_OPTIONS) + 1  # and -h
    for action in serve._actions:
        assert action.help and action.help.strip(), action.dest


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for option in ALL_OPTIONS:
        assert option.names[0] in shown
    assert "--no-enable-prefix-caching" in shown and "-tp" in shown


def test_env_names_follow_the_flag() -> None:
    assert env_name("--max-num-seqs") == "WINNOW_MAX_NUM_SEQS"
    by_field = {option.field: option for option in ALL_OPTIONS}
    assert by_field["kv_cache_memory_gib"].env == "WINNOW_KV_CACHE_MEMORY"
    assert by_field["cpu_kernels"].env == "WINNOW_NO_CPU_KERNELS"
    assert by_field["api_keys"].env == "WINNOW_API_KEY"


def test_a_vllm_command_line_maps_onto_the_configs() -> None:
    vllm, engine, server = parse(
        *("--model", "org/model", "--tokenizer", "org/tokenizer", "--revision", "v2"),
        *("--download-dir", "/tmp/models", "--dtype", "half", "--tensor-parallel-size", "1"),
        *("--enable-prefix-caching", "--uvicorn-log-level", "warning"),
        *("--disable-log-requests", "--disable-log-stats", "--seed", "1234"),
        *("--max-logprobs", "5", "--enforce-eager", "--generation-config", "vllm"),
        *("--api-key", "k1", "--api-key", "k2", "--served-model-name", "a", "b"),
    )
    assert (engine.model, engine.tokenizer, engine.revision) == ("org/model", "org/tokenizer", "v2")
    assert engine.download_dir == "/tmp/models"
    assert engine.dtype == "half"
    assert engine.enable_prefix_caching is True
    assert engine.seed == 1234
    assert engine.max_logprobs == 5
    assert engine.enforce_eager is True
    assert engine.generation_config == "vllm"
    assert server.uvicorn_log_level == "warning"
    assert server.log_stats is False
    assert server.api_keys == ["k1", "k2"] and server.served_model_names == ["a", "b"]
    assert vllm.disable_log_requests is True and engine.tensor_parallel_size == 1


def test_defaults_without_flags() -> None:
    _, engine, server = parse("org/model")
    assert engine.model == "org/model"
    assert (engine.tokenizer, engine.revision, engine.download_dir, engine.seed) == (None,) * 4
    assert engine.enable_prefix_caching is True and engine.enforce_eager is False
    assert engine.cpu_kernels is True
    assert engine.max_logprobs == 20
    assert engine.generation_config == "auto"  # vLLM's default
    assert server.log_stats is True and server.uvicorn_log_level == "info"
    assert (server.host, server.port, server.api_keys) == ("127.0.0.1", 8000, [])
    assert parse()[1].model == "smollm2"


def test_no_flag_is_a_config_default() -> None:
    """What the command line leaves out is the field's own default, not a second copy."""
    _, engine, server = parse()
    assert engine == EngineConfig() and server == ServerConfig()


@pytest.mark.parametrize("dtype", ["auto", "half", "float16", "bfloat16", "float", "float32"])
def test_vllm_dtype_spellings(dtype: str) -> None:
    assert parse("--dtype", dtype)[1].dtype == dtype


def test_switches_both_ways() -> None:
    assert parse("--no-enable-prefix-caching")[1].enable_prefix_caching is False
    assert parse("--no-cpu-kernels")[1].cpu_kernels is False
    assert parse("--no-enable-auto-tool-choice")[2].enable_auto_tool_choice is False


def test_model_flag_and_positional_are_the_same_thing() -> None:
    assert parse("--model", "a/b")[1].model == "a/b"
    assert parse("a/b", "--model", "a/b")[1].model == "a/b"


def test_max_logprobs_minus_one_is_the_api_bound() -> None:
    assert parse("--max-logprobs", "-1")[1].max_logprobs == 20


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("-tp", "0"), "--tensor-parallel-size 0: must be 1 or more"),
        (("--max-connections", "0"), "--max-connections 0: must be 1 or more"),
        (("--request-timeout", "0"), "--request-timeout 0.0: must be more than 0"),
        (("--master-port", "70000"), "not a TCP port"),
        (("-tp", "3", "--nnodes", "2"), "3 ranks do not split evenly over 2 nodes"),
        (
            ("-tp", "2", "--nnodes", "2", "--node-rank", "2"),
            "--node-rank 2 is not below --nnodes 2",
        ),
        (("-tp", "2", "--nnodes", "2"), "--nnodes 2 needs --master-port"),
        (("--generation-config", "/no/such/dir"), "not 'auto', 'vllm' or a folder"),
        (("--max-logprobs", "21"), "at most 20"),
        (("--max-logprobs", "-2"), "must be -1 or 0-20"),
        (("a/b", "--model", "c/d"), "two values given for model"),
        (("--dtype", "int8"), "invalid choice"),
        (("--port", "abc"), "invalid int value"),
        (("--log-level", "loud"), "not a logging level"),
    ],
)
def test_refusals_say_why(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], reason: str
) -> None:
    assert reason in refusal(capsys, *argv)


# Values given through WINNOW_<FLAG> that need more than the field's type to choose, and what
# they become: field -> (value, parsed value).
ENV_EXAMPLES: dict[str, tuple[str, Any]] = {
    "port": ("9001", 9001),
    "served_model_names": ("a,b", ["a", "b"]),
    "api_keys": ("k1,k2", ["k1", "k2"]),
    "allowed_origins": ("http://a,http://b", ["http://a", "http://b"]),
    "accept_any_model": ("1", True),
    "public_metrics": ("yes", True),
    "enforce_eager": ("true", True),
    "enable_prefix_caching": ("0", False),
    "enable_auto_tool_choice": ("off", False),
    "cpu_kernels": ("1", False),  # WINNOW_NO_CPU_KERNELS=1
    "log_stats": ("1", False),  # WINNOW_DISABLE_LOG_STATS=1
    "kv_cache_memory_gib": ("0.5", 0.5),
    "max_logprobs": ("5", 5),
    "generation_config": ("vllm", "vllm"),
    "log_level": ("debug", "debug"),
    "disable_log_requests": ("1", True),
    "tool_call_parser": ("mistral", "mistral"),
    "dtype": ("half", "half"),
    "response_store": ("postgresql://u@h/db", "postgresql://u@h/db"),
}


def env_example(option: Option) -> tuple[str, Any]:
    """A value for the option's variable that differs from its default, and what it parses to."""
    if option.field in ENV_EXAMPLES:
        return ENV_EXAMPLES[option.field]
    if option.choices is not None:
        choice = next(choice for choice in option.choices if choice != option.default)
        return str(choice), choice
    if option.kind == "switch":
        return ("0", False) if option.default else ("1", True)
    if option.kind == "list":
        return "x,y", ["x", "y"]
    if option.convert is int:
        return "3", 3
    if option.convert is float:
        return "0.25", 0.25
    return "some/value", "some/value"


def parsed_field(field: str) -> Any:
    for config in parse():
        if field in {f.name for f in dataclasses.fields(config)}:
            return getattr(config, field)
    raise AssertionError(f"no config has {field}")


# Every flag but --nnodes and --node-rank, which need -tp and each other beside them.
@pytest.mark.parametrize(
    "option",
    [option for option in ALL_OPTIONS if option.field not in ("nnodes", "node_rank")],
    ids=lambda option: option.names[0],
)
def test_every_flag_reads_its_env_var(option: Option, monkeypatch: pytest.MonkeyPatch) -> None:
    value, expected = env_example(option)
    assert expected != option.default
    monkeypatch.setenv(option.env, value)
    assert parsed_field(option.field) == expected


def test_the_flag_wins_over_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINNOW_PORT", "9001")
    monkeypatch.setenv("WINNOW_MODEL", "env/model")
    monkeypatch.setenv("WINNOW_ENABLE_PREFIX_CACHING", "0")
    monkeypatch.setenv("WINNOW_API_KEY", "env-key")
    _, engine, server = parse(
        "flag/model", "--port", "9002", "--enable-prefix-caching", "--api-key", "flag-key"
    )
    assert (engine.model, server.port, engine.enable_prefix_caching) == ("flag/model", 9002, True)
    assert server.api_keys == ["flag-key"]


def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINNOW_PORT", "")
    monkeypatch.setenv("WINNOW_ENABLE_PREFIX_CACHING", "")
    _, engine, server = parse()
    assert server.port == 8000 and engine.enable_prefix_caching is True


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("WINNOW_TENSOR_PARALLEL_SIZE", "0", "WINNOW_TENSOR_PARALLEL_SIZE=0: must be 1 or more"),
        ("WINNOW_PORT", "abc", "WINNOW_PORT='abc': invalid int value: 'abc'"),
        ("WINNOW_DTYPE", "int8", "WINNOW_DTYPE='int8': invalid choice: 'int8'"),
        ("WINNOW_KV_CACHE_DTYPE", "int4", "invalid choice: 'int4'"),
        ("WINNOW_TOOL_CALL_PARSER", "xml", "invalid choice: 'xml'"),
        ("WINNOW_ENFORCE_EAGER", "maybe", "expected 1/0, true/false, yes/no or on/off"),
        ("WINNOW_MAX_LOGPROBS", "21", "WINNOW_MAX_LOGPROBS=21: must be -1 or 0-20"),
        ("WINNOW_GENERATION_CONFIG", "/no/such/dir", "not 'auto', 'vllm' or a folder"),
    ],
)
def test_env_refusals_say_why_too(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    reason: str,
) -> None:
    monkeypatch.setenv(variable, value)
    err = refusal(capsys)
    assert reason in err
    assert err.strip().splitlines()[-1].startswith("winnow serve: error: ")


def test_a_bad_variable_does_not_break_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variables are read only by `winnow serve`, after parsing: --help and the other commands
    never see them (WINNOW_PORT=abc used to crash every subcommand with a traceback)."""
    monkeypatch.setenv("WINNOW_PORT", "abc")
    monkeypatch.setenv("WINNOW_DTYPE", "int8")
    for argv in (["--help"], ["serve", "--help"], ["demo-model", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        assert "usage: winnow" in capsys.readouterr().out


def test_the_argparse_defaults_are_unset() -> None:
    """Nothing but the command line is in the parsed arguments: the environment and the fields'
    defaults come after (a parser default would hide the variable)."""
    parser, _ = build_parser()
    args = parser.parse_args(["serve"])
    assert vars(args) == {"command": "serve"}
