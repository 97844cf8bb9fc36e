"""Which device `--device` means, refusing rather than silently serving on the CPU.

A CUDA host whose driver is older than the one torch's CUDA build needs shows NVIDIA devices
(device nodes, `nvidia-smi`, NVIDIA_VISIBLE_DEVICES from the container toolkit) while
`torch.cuda.is_available()` is False. Picking the CPU there would serve at a hundredth of the
speed without a word, so `auto` refuses instead and names the mismatch; `--device cpu` is the
explicit way to serve on the CPU anyway.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

# The oldest Linux driver for the CUDA 12.6 build the image ships (NVIDIA's CUDA 12.6 release
# notes, "minimum required driver for minor version compatibility" is 525.60.13).
MIN_DRIVER_CUDA_12_6 = "525.60.13"
_NVIDIA_SMI_TIMEOUT_S = 10


class DeviceError(RuntimeError):
    """`--device` cannot be served here; the message is one line saying what to do."""


@dataclass(frozen=True)
class NvidiaHost:
    """Signs of NVIDIA GPUs on this host, whatever torch thinks of them."""

    device_nodes: tuple[str, ...]
    nvidia_smi: str | None
    visible_devices: str | None

    @property
    def has_gpus(self) -> bool:
        visible = (self.visible_devices or "").strip().lower()
        return bool(self.device_nodes or self.nvidia_smi or visible not in ("", "void", "none"))

    def driver_version(self, run: Callable[[Sequence[str]], str] | None = None) -> str | None:
        """The driver version `nvidia-smi` reports, or None if it cannot say."""
        if self.nvidia_smi is None:
            return None
        query = [self.nvidia_smi, "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            output = (run or _run)(query)
        except (OSError, subprocess.SubprocessError):
            return None
        lines = output.strip().splitlines()
        return lines[0].strip() if lines else None


def probe_nvidia_host(
    env: Mapping[str, str] | None = None, dev_glob: str = "/dev/nvidia[0-9]*"
) -> NvidiaHost:
    """What this host shows of NVIDIA GPUs (`env` and `dev_glob` are for tests)."""
    env = os.environ if env is None else env
    return NvidiaHost(
        device_nodes=tuple(sorted(glob.glob(dev_glob))),
        nvidia_smi=shutil.which("nvidia-smi", path=env.get("PATH")),
        visible_devices=env.get("NVIDIA_VISIBLE_DEVICES"),
    )


def resolve_device(
    device: str,
    *,
    cuda_available: bool | None = None,
    host: NvidiaHost | None = None,
) -> torch.device:
    """The torch device `--device` names; DeviceError when it cannot be served here.

    `cuda_available` and `host` default to torch's answer and this host's probe (tests pass
    their own)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "auto":
        if cuda_available:
            return torch.device("cuda")
        host = probe_nvidia_host() if host is None else host
        if host.has_gpus:
            raise DeviceError(_mismatch_message(host))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        message = f"--device {device!r} is not a device (cpu, cuda, cuda:N or auto)"
        raise DeviceError(message) from exc
    if resolved.type == "cuda" and not cuda_available:
        host = probe_nvidia_host() if host is None else host
        reason = _mismatch_message(host) if host.has_gpus else _no_cuda_message(device)
        raise DeviceError(reason)
    if resolved.type == "cuda" and resolved.index is not None:
        count = torch.cuda.device_count()
        if resolved.index >= count:
            raise DeviceError(f"--device {device}: this host has {count} CUDA device(s)")
    return resolved


def _torch_build() -> str:
    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({f'built for CUDA {cuda}' if cuda else 'a CPU-only build'})"


def _mismatch_message(host: NvidiaHost) -> str:
    driver = host.driver_version()
    seen = f"NVIDIA driver {driver}" if driver else "NVIDIA GPUs"
    return (
        f"{seen} visible but {_torch_build()} cannot use them: the driver is too old for this "
        f"CUDA build, torch has no CUDA, or the container lacks GPU access; install a torch "
        f"build for the driver's CUDA (CUDA 12.6 needs driver >= {MIN_DRIVER_CUDA_12_6}), run "
        f"with --gpus all, or pass --device cpu to serve on the CPU"
    )


def _no_cuda_message(device: str) -> str:
    return (
        f"--device {device}: CUDA is not available (no NVIDIA GPU visible; {_torch_build()}); "
        f"use --device cpu or auto"
    )


def use_device(device: torch.device) -> None:
    """Make `device` current on the calling thread, so Triton launches, events and graph
    capture go to cuda:N rather than cuda:0 (call on the thread that runs the model)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def startup_line(device: torch.device) -> str:
    """One log line: the device served on and, on CUDA, the build and the driver it needs."""
    if device.type != "cuda":
        return f"serving on {device}"
    cuda = torch.version.cuda or "?"
    host = probe_nvidia_host()
    driver = host.driver_version() or "unknown"
    return (
        f"serving on {device} ({torch.cuda.get_device_name(device)}); torch "
        f"{torch.__version__} for CUDA {cuda}, driver {driver} (CUDA 12.6 needs >= "
        f"{MIN_DRIVER_CUDA_12_6})"
    )


def _run(command: Sequence[str]) -> str:
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S, check=True
    ).stdout
