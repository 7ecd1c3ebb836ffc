"""Compile the kernels for an NVIDIA architecture on a machine without a GPU, and read their resource use.

Triton lowers a kernel to PTX and assembles it with the ptxas it ships, all on the CPU: no driver, no
device. That catches what the interpreter forgives (it reads any Python global; compiled code reads only
`tl.constexpr` ones) and shows registers, spills and shared memory before a GPU is at hand.

    python -m emllm_kernels.compile_check [--arch 90] [--json]     # one row per variant

Each variant is compiled with the block sizes its launcher would choose, and with the 16-byte
alignment and divisibility a launch on contiguous tensors (head_dim 64 or 128) gets.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

from .backend import is_interpreted, next_power_of_2
from .episodic_attention import attention_launch_config
from .event_scores import EVENTS_PER_PROGRAM
from .received_mass import received_mass_launch_config

# the most shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
EXIT_OVER_SHARED_MEMORY = 3  # the exit status when a variant needs more shared memory than a block may have
FP32_POINTERS = {"LSE", "MASS", "SCORES"}  # outputs and inputs that are fp32 whatever the model's dtype


@dataclass(frozen=True)
class Variant:
    """One compilation: the kernel, its input dtype and head size, the GQA group, and the folded query
    rows (group * chunk length) that fix the attention kernel's blocks: a few to decode, many for a chunk."""

    kernel: str
    dtype: torch.dtype
    head_dim: int
    group: int = 4
    rows: int = 2048


@dataclass(frozen=True)
class ResourceUsage:
    variant: Variant
    arch: int
    registers: int
    spill_bytes: int  # spill stores + spill loads, per thread
    shared_bytes: int
    num_warps: int
    constexprs: dict
    seconds: float

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_MEMORY_LIMIT.get(self.arch, min(SHARED_MEMORY_LIMIT.values()))

    def as_row(self) -> dict:
        v = self.variant
        row = {"kernel": v.kernel, "dtype": TRITON_TYPE[v.dtype], "head_dim": v.head_dim, "group": v.group}
        row.update(rows=v.rows, arch=self.arch, num_warps=self.num_warps, **self.constexprs)
        row.update(registers=self.registers, spill_bytes=self.spill_bytes, shared_bytes=self.shared_bytes)
        return {**row, "fits": self.fits, "seconds": round(self.seconds, 1)}


def _jitted(kernel: str):
    """The jitted function of a kernel, from its private module (`_<kernel>_jit.<kernel>_kernel`)."""
    if kernel not in ("episodic_attention", "received_mass", "event_scores"):
        raise ValueError(f"unknown kernel {kernel!r}")
    return getattr(importlib.import_module(f"._{kernel}_jit", __package__), f"{kernel}_kernel")


def _launch_config(variant: Variant, arch: int) -> tuple[dict, int]:
    """(constexprs, num_warps) as the launcher would pick them on that architecture."""
    block_d = max(16, next_power_of_2(variant.head_dim))
    ieee = variant.dtype == torch.float32
    if variant.kernel == "episodic_attention":
        block_m, block_n, num_warps = attention_launch_config(variant.rows, block_d, ieee, arch)
        constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "IEEE_FP32": ieee}
    elif variant.kernel == "received_mass":
        block_m, block_n, num_warps = received_mass_launch_config(block_d, ieee)
        constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "IEEE_FP32": ieee}
    else:
        constexprs, num_warps = {"BLOCK_E": EVENTS_PER_PROGRAM}, 4
    return {"GROUP": variant.group, "BLOCK_D": block_d, **constexprs}, num_warps


def compile_variant(variant: Variant, arch: int = 90):
    """The compiled kernel (PTX and cubin in `.asm`) and the constexprs and warps it was built with."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _jitted(variant.kernel)
    if is_interpreted(kernel):
        msg = "the kernels were imported under TRITON_INTERPRET=1: compile in a process without it"
        raise RuntimeError(msg)
    constexprs, num_warps = _launch_config(variant, arch)
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():  # tensors: 16-byte aligned, as torch allocates them
            signature[name] = "*fp32" if name in FP32_POINTERS else "*" + TRITON_TYPE[variant.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "scale_log2":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            # multiples of 16 for head_dim 64 and up, except what the kernel never specialises on
            if (name.startswith("s_") or name == "head_dim") and name not in kernel.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
    constants = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": 2}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options), constexprs, num_warps


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) that ptxas reports for the kernel in `ptx`, assembled as Triton does."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        ptxas = get_ptxas(arch).path
        gpu = f"--gpu-name=sm_{arch}{suffix}"
        command = [ptxas, "-v", "--regAllocOptLevel=2", gpu, path, "-o", path + ".o"]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


def resource_usage(variant: Variant, arch: int = 90) -> ResourceUsage:
    start = time.perf_counter()
    compiled, constexprs, num_warps = compile_variant(variant, arch)
    seconds = time.perf_counter() - start
    registers, spills = _ptxas_report(compiled.asm["ptx"], arch)
    shared = compiled.metadata.shared
    return ResourceUsage(variant, arch, registers, spills, shared, num_warps, constexprs, seconds)


def launched_variants() -> list[Variant]:
    """What the engine launches on a GPU: each kernel in the three dtypes at head_dim 64 and 128 (and bf16 at
    256, the largest), the attention kernel both for a prefill chunk and for one decoded token."""
    kernels = ("episodic_attention", "received_mass", "event_scores")
    shapes = [(dtype, d) for dtype in (torch.bfloat16, torch.float16, torch.float32) for d in (64, 128)]
    shapes.append((torch.bfloat16, 256))
    variants = [Variant(kernel, dtype, d) for dtype, d in shapes for kernel in kernels]
    decoding = [(torch.bfloat16, 1, 128), (torch.bfloat16, 4, 256)]  # GQA group rows of one token
    decoding += [(dtype, 4, 128) for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    for dtype, group, head_dim in decoding:
        variants.append(Variant("episodic_attention", dtype, head_dim, group=group, rows=group))
    return variants


def markdown_table(usages: list[ResourceUsage]) -> str:
    lines = [
        "| kernel | dtype | head_dim | rows | blocks | warps | registers | spill bytes | shared KiB |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for u in usages:
        v = u.variant
        blocks = " ".join(f"{k}={val}" for k, val in u.constexprs.items() if k.startswith("BLOCK"))
        rows = v.rows if v.kernel == "episodic_attention" else "-"
        lines.append(
            f"| {v.kernel} | {TRITON_TYPE[v.dtype]} | {v.head_dim} | {rows} | {blocks} | {u.num_warps} "
            f"| {u.registers} | {u.spill_bytes} | {u.shared_bytes / 1024:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100)")
    parser.add_argument("--json", action="store_true", help="JSON rows instead of a markdown table")
    args = parser.parse_args(argv)
    usages = [resource_usage(variant, args.arch) for variant in launched_variants()]
    if args.json:
        print(json.dumps([usage.as_row() for usage in usages], indent=1))
    else:
        print(f"sm_{args.arch}\n\n{markdown_table(usages)}")
    return 0 if all(u.fits for u in usages) else EXIT_OVER_SHARED_MEMORY


if __name__ == "__main__":
    raise SystemExit(main())
