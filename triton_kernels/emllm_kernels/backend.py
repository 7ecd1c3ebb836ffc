"""Where the Triton kernels can run: probes that never import CUDA, and the launch-time checks.

The jitted kernels live in private `_*_jit.py` modules imported on the first launch, so importing
emllm_kernels needs neither triton nor a GPU.

Triton decides at decoration time whether `@triton.jit` compiles for the GPU or builds an interpreted
function (TRITON_INTERPRET=1: CPU tensors, numpy underneath), and its own standard library (tl.sum,
tl.zeros, ...) is decorated when triton is first imported. transformers' model code imports triton (through
torch._dynamo), so the variable must be in the environment before that: set it when the process starts.
`check_launchable` turns a late setting into a clear error. Knows nothing about attention.
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
    if device.type == "cpu" and not (is_interpreted(kernel) and _standard_library_interpreted()):
        msg = (
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 in the environment before the "
            "process imports triton (transformers' model code does); it was set too late or not at all"
        )
        raise KernelUnavailableError(msg)
    if device.type == "cuda" and is_interpreted(kernel):
        msg = "this process runs Triton as its CPU interpreter (TRITON_INTERPRET=1); move the tensors to CPU"
        raise KernelUnavailableError(msg)


def is_interpreted(kernel) -> bool:
    """The jitted function runs in Triton's interpreter (decided when its module was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _standard_library_interpreted() -> bool:
    import triton.language as tl

    return is_interpreted(tl.zeros)


@functools.cache
def _cuda_properties(index: int):
    """Read once per device: the launchers ask on every call, per layer and decoded token."""
    return torch.cuda.get_device_properties(index)


def _properties(device: torch.device):
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


def compute_capability(device: torch.device) -> int:
    """Major x 10 + minor for a CUDA device (90: H100); 90 elsewhere (the interpreter ignores it)."""
    if device.type != "cuda":
        return 90
    properties = _properties(device)
    return 10 * properties.major + properties.minor


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM or H200)."""
    return _properties(device).multi_processor_count


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


__all__ = [
    "MAX_HEAD_DIM",
    "KernelUnavailableError",
    "check_launchable",
    "compute_capability",
    "interpreter_requested",
    "is_interpreted",
    "multiprocessor_count",
    "next_power_of_2",
    "triton_installed",
    "unavailable_reason",
]
