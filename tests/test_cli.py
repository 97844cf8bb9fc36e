"""`winnow serve`'s command line: vLLM's flags with vLLM's meaning, WINNOW_* variables, refusals."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from winnow.cli import _configs, build_parser, check_serve_args, env_name
from winnow.config import EngineConfig, ServerConfig


def serve_options() -> list[argparse.Action]:
    _, serve = build_parser()
    return [action for action in serve._actions if action.option_strings]


@pytest.fixture(autouse=True)
def no_winnow_flags_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for action in serve_options():
        monkeypatch.delenv(env_name(action.option_strings[0]), raising=False)
    monkeypatch.delenv("WINNOW_API_KEY", raising=False)


def parse(*argv: str) -> tuple[argparse.Namespace, EngineConfig, ServerConfig]:
    parser, serve = build_parser()
    args = parser.parse_args(["serve", *argv])
    check_serve_args(args, serve)
    return (args, *_configs(args))


def refusal(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_every_flag_has_help() -> None:
    parser, serve = build_parser()
    for action in serve._actions:
        assert action.help and action.help.strip(), action.dest


def test_a_vllm_command_line_maps_onto_the_configs() -> None:
    args, engine, server = parse(
        *("--model", "org/model", "--tokenizer", "org/tokenizer", "--revision", "v2"),
        *("--download-dir", "/tmp/models", "--dtype", "half", "--tensor-parallel-size", "1"),
        *("--enable-prefix-caching", "--uvicorn-log-level", "warning"),
        *("--disable-log-requests", "--disable-log-stats", "--seed", "1234"),
        *("--max-logprobs", "5", "--enforce-eager", "--generation-config", "vllm"),
    )
    assert (engine.model, engine.tokenizer, engine.revision) == ("org/model", "org/tokenizer", "v2")
    assert engine.download_dir == "/tmp/models"
    assert engine.dtype == "half"
    assert engine.enable_prefix_caching is True
    assert engine.seed == 1234
    assert engine.max_logprobs == 5
    assert engine.enforce_eager is True
    assert engine.generation_config == "vllm"
    assert args.uvicorn_log_level == "warning"
    assert server.log_stats is False
    assert args.disable_log_requests is True


def test_defaults_without_flags() -> None:
    args, engine, server = parse("org/model")
    assert engine.model == "org/model"
    assert (engine.tokenizer, engine.revision, engine.download_dir, engine.seed) == (None,) * 4
    assert engine.enable_prefix_caching is True and engine.enforce_eager is False
    assert engine.max_logprobs == 20
    assert engine.generation_config == "auto"  # vLLM's default
    assert server.log_stats is True and args.uvicorn_log_level == "info"


@pytest.mark.parametrize("dtype", ["auto", "half", "float16", "bfloat16", "float", "float32"])
def test_vllm_dtype_spellings(dtype: str) -> None:
    assert parse("--dtype", dtype)[1].dtype == dtype


def test_prefix_caching_can_be_switched_off() -> None:
    assert parse("--no-enable-prefix-caching")[1].enable_prefix_caching is False


def test_model_flag_and_positional_are_the_same_thing() -> None:
    assert parse("--model", "a/b")[1].model == "a/b"
    assert parse("a/b", "--model", "a/b")[1].model == "a/b"


def test_max_logprobs_minus_one_is_the_api_bound() -> None:
    assert parse("--max-logprobs", "-1")[1].max_logprobs == 20


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("--tensor-parallel-size", "2"), "only 1 is supported"),
        (("-tp", "4"), "only 1 is supported"),
        (("--generation-config", "/no/such/dir"), "not 'auto', 'vllm' or a folder"),
        (("--max-logprobs", "21"), "at most 20"),
        (("--max-logprobs", "-2"), "must be -1 or 0-20"),
        (("a/b", "--model", "c/d"), "two models given"),
        (("--dtype", "int8"), "invalid choice"),
    ],
)
def test_refusals_say_why(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], reason: str
) -> None:
    assert reason in refusal(capsys, *argv)


# One value per flag, given through WINNOW_<FLAG>: (value, where it lands, field, parsed value).
ENV_VALUES: dict[str, tuple[str, str, str, Any]] = {
    "--model": ("org/model", "engine", "model", "org/model"),
    "--tokenizer": ("org/tok", "engine", "tokenizer", "org/tok"),
    "--revision": ("v1", "engine", "revision", "v1"),
    "--download-dir": ("/tmp/dl", "engine", "download_dir", "/tmp/dl"),
    "--host": ("0.0.0.0", "server", "host", "0.0.0.0"),
    "--port": ("9001", "server", "port", 9001),
    "--served-model-name": ("a,b", "server", "served_model_names", ["a", "b"]),
    "--api-key": ("k1,k2", "server", "api_keys", ["k1", "k2"]),
    "--accept-any-model": ("1", "server", "accept_any_model", True),
    "--dtype": ("half", "engine", "dtype", "half"),
    "--device": ("cpu", "engine", "device", "cpu"),
    "--tensor-parallel-size": ("1", "args", "tensor_parallel_size", 1),
    "--seed": ("42", "engine", "seed", 42),
    "--max-model-len": ("128", "engine", "max_model_len", 128),
    "--max-num-seqs": ("3", "engine", "max_num_seqs", 3),
    "--max-queue": ("5", "engine", "max_queue", 5),
    "--max-num-batched-tokens": ("64", "engine", "max_num_batched_tokens", 64),
    "--block-size": ("8", "engine", "block_size", 8),
    "--kv-cache-memory": ("0.5", "engine", "kv_cache_memory_gib", 0.5),
    "--gpu-memory-utilization": ("0.5", "engine", "gpu_memory_utilization", 0.5),
    "--num-kv-blocks": ("40", "engine", "num_kv_blocks", 40),
    "--kv-cache-dtype": ("bfloat16", "engine", "kv_cache_dtype", "bfloat16"),
    "--enable-prefix-caching": ("0", "engine", "enable_prefix_caching", False),
    "--enforce-eager": ("true", "engine", "enforce_eager", True),
    "--no-cpu-kernels": ("1", "engine", "cpu_kernels", False),
    "--num-threads": ("2", "engine", "num_threads", 2),
    "--max-n": ("4", "engine", "max_n", 4),
    "--max-logprobs": ("5", "engine", "max_logprobs", 5),
    "--generation-config": ("vllm", "engine", "generation_config", "vllm"),
    "--max-request-bytes": ("1000", "server", "max_request_bytes", 1000),
    "--allowed-origins": (
        "http://a,http://b",
        "server",
        "allowed_origins",
        ["http://a", "http://b"],
    ),
    "--public-metrics": ("yes", "server", "public_metrics", True),
    "--chat-template": ("/tmp/t.jinja", "engine", "chat_template", "/tmp/t.jinja"),
    "--shutdown-timeout": ("3.5", "server", "shutdown_timeout", 3.5),
    "--trust-remote-code": ("1", "engine", "trust_remote_code", True),
    "--tool-call-parser": ("mistral", "server", "tool_call_parser", "mistral"),
    "--allow-special-tokens-in-content": (
        "1",
        "server",
        "allow_special_tokens_in_content",
        True,
    ),
    "--enable-auto-tool-choice": ("0", "server", "enable_auto_tool_choice", False),
    "--log-level": ("debug", "args", "log_level", "debug"),
    "--uvicorn-log-level": ("warning", "args", "uvicorn_log_level", "warning"),
    "--disable-log-stats": ("1", "server", "log_stats", False),
    "--disable-log-requests": ("1", "args", "disable_log_requests", True),
}


def test_the_env_table_covers_every_flag() -> None:
    flags = {action.option_strings[0] for action in serve_options()} - {"-h"}
    assert flags == set(ENV_VALUES)


@pytest.mark.parametrize("flag", sorted(ENV_VALUES))
def test_every_flag_reads_its_env_var(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    value, where, field, expected = ENV_VALUES[flag]
    monkeypatch.setenv(env_name(flag), value)
    args, engine, server = parse()
    source = {"args": args, "engine": engine, "server": server}[where]
    assert getattr(source, field) == expected


def test_the_flag_wins_over_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINNOW_PORT", "9001")
    monkeypatch.setenv("WINNOW_MODEL", "env/model")
    monkeypatch.setenv("WINNOW_ENABLE_PREFIX_CACHING", "0")
    _, engine, server = parse("flag/model", "--port", "9002", "--enable-prefix-caching")
    assert (engine.model, server.port, engine.enable_prefix_caching) == ("flag/model", 9002, True)


def test_env_refusals_say_why_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINNOW_TENSOR_PARALLEL_SIZE", "2")
    assert "only 1 is supported" in refusal(capsys)
