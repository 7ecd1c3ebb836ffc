"""Where the Triton kernels can run: probes that never import CUDA, and the launch-time checks.

Triton decides at decoration time whether `@triton.jit` compiles for the GPU or builds an interpreted
function (TRITON_INTERPRET=1, CPU tensors, numpy underneath). That is why the jitted kernels live in
private `_*_jit.py` modules imported on first launch: setting the variable any time before the first
launch is enough. Knows nothing about attention.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

MAX_HEAD_DIM = 256  # one head must fit a register tile: larger dims would need a split over D


class KernelUnavailableError(RuntimeError):
    """The Triton kernels cannot run here (no triton, CPU tensors without the interpreter, ...)."""


@functools.cache
def triton_installed() -> bool:
    """triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """TRITON_INTERPRET is set to a true value (triton's own spelling of booleans)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason(device: torch.device | str, head_dim: int) -> str | None:
    """Why the kernels cannot run on tensors of this device and head size; None when they can."""
    device = torch.device(device)
    if not triton_installed():
        return "the triton package is not installed (pip install 'emllm-integrations[gpu]')"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} exceeds the kernels' maximum ({MAX_HEAD_DIM})"
    if device.type == "cpu" and not interpreter_requested():
        return "tensors are on the CPU: Triton runs there only as its interpreter (TRITON_INTERPRET=1)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton has no backend for {device.type} tensors"
    return None


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Refuse a launch that would fail obscurely: mixed devices, or a compiled kernel on CPU tensors.

    The second happens when TRITON_INTERPRET=1 was set only after the kernel module was imported.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelUnavailableError(f"kernel inputs on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not is_interpreted(kernel):
        msg = (
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before the first kernel launch "
            "of this process (this kernel was already compiled for the GPU)"
        )
        raise KernelUnavailableError(msg)
    if device.type == "cuda" and is_interpreted(kernel):
        msg = "this process runs Triton as its CPU interpreter (TRITON_INTERPRET=1); move the tensors to CPU"
        raise KernelUnavailableError(msg)


def is_interpreted(kernel) -> bool:
    """The jitted function runs in Triton's interpreter (decided when its module was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


__all__ = [
    "MAX_HEAD_DIM",
    "KernelUnavailableError",
    "check_launchable",
    "interpreter_requested",
    "is_interpreted",
    "next_power_of_2",
    "triton_installed",
    "unavailable_reason",
]
