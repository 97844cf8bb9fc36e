"""--device: no silent CPU fallback on a host that shows NVIDIA GPUs torch cannot use.

The host's signs (device nodes, nvidia-smi, NVIDIA_VISIBLE_DEVICES) are simulated with real
files and environments handed to the probe; torch itself is not patched.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from winnow.models.device import (
    MIN_DRIVER_CUDA_12_6,
    DeviceError,
    NvidiaHost,
    probe_nvidia_host,
    resolve_device,
    use_device,
)

BARE = {"PATH": "/nonexistent"}


def fake_nvidia_smi(folder: Path, driver: str) -> Path:
    """An `nvidia-smi` on a PATH of its own that answers the driver-version query."""
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho {driver}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


def test_a_bare_cpu_host_serves_auto_on_the_cpu(tmp_path: Path) -> None:
    host = probe_nvidia_host(BARE, dev_glob=str(tmp_path / "nvidia[0-9]*"))
    assert not host.has_gpus
    assert resolve_device("auto", cuda_available=False, host=host) == torch.device("cpu")


@pytest.mark.parametrize("value", ["void", "none", "", "NONE"])
def test_void_visible_devices_is_no_gpu(tmp_path: Path, value: str) -> None:
    env = {**BARE, "NVIDIA_VISIBLE_DEVICES": value}
    assert not probe_nvidia_host(env, dev_glob=str(tmp_path / "x*")).has_gpus


def test_a_device_node_refuses_auto_without_cuda(tmp_path: Path) -> None:
    (tmp_path / "nvidia0").touch()
    host = probe_nvidia_host(BARE, dev_glob=str(tmp_path / "nvidia[0-9]*"))
    assert host.device_nodes == (str(tmp_path / "nvidia0"),)
    with pytest.raises(DeviceError) as refused:
        resolve_device("auto", cuda_available=False, host=host)
    message = str(refused.value)
    assert "\n" not in message
    assert f"torch {torch.__version__}" in message
    assert "--device cpu" in message
    assert MIN_DRIVER_CUDA_12_6 in message


def test_the_refusal_names_the_driver_nvidia_smi_reports(tmp_path: Path) -> None:
    bin_dir = fake_nvidia_smi(tmp_path, "535.104.05")
    host = probe_nvidia_host({"PATH": str(bin_dir)}, dev_glob=str(tmp_path / "none*"))
    assert host.nvidia_smi == str(bin_dir / "nvidia-smi")
    assert host.driver_version() == "535.104.05"
    with pytest.raises(DeviceError, match="NVIDIA driver 535.104.05 visible"):
        resolve_device("auto", cuda_available=False, host=host)


def test_visible_devices_alone_refuses_auto(tmp_path: Path) -> None:
    env = {**BARE, "NVIDIA_VISIBLE_DEVICES": "all"}
    host = probe_nvidia_host(env, dev_glob=str(tmp_path / "none*"))
    assert host.has_gpus and host.driver_version() is None
    with pytest.raises(DeviceError, match="NVIDIA GPUs visible"):
        resolve_device("auto", cuda_available=False, host=host)


def test_device_cpu_overrides_visible_gpus() -> None:
    host = NvidiaHost(("/dev/nvidia0",), None, "all")
    assert resolve_device("cpu", cuda_available=False, host=host) == torch.device("cpu")


def test_cuda_without_cuda_is_one_line() -> None:
    host = NvidiaHost((), None, None)
    with pytest.raises(DeviceError) as refused:
        resolve_device("cuda:1", cuda_available=False, host=host)
    assert "CUDA is not available" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_malformed_device_is_refused() -> None:
    with pytest.raises(DeviceError, match="is not a device"):
        resolve_device("gpu0", cuda_available=False, host=NvidiaHost((), None, None))


def test_use_device_leaves_the_cpu_alone() -> None:
    use_device(torch.device("cpu"))  # no CUDA call on a CPU device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_use_device_sets_the_current_device_of_the_calling_thread() -> None:
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    seen: list[int] = []

    def engine_thread() -> None:
        use_device(last)
        seen.append(torch.cuda.current_device())

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    assert seen == [last.index]


def serve_exit(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "winnow", "serve", "demo", *flags],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without CUDA")
def test_serve_device_cuda_without_cuda_exits_with_one_line() -> None:
    result = serve_exit("--device", "cuda")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without CUDA")
def test_serve_auto_refuses_when_the_container_toolkit_shows_gpus() -> None:
    result = serve_exit(env={"NVIDIA_VISIBLE_DEVICES": "all"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "--device cpu" in result.stderr.strip().splitlines()[-1]
