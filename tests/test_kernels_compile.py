"""The Triton kernels compile for Hopper (sm_90: the H100/H200 of benchmarks/gpu_check.sh) and Ampere (sm_80)
on this CPU-only machine, with the blocks their launchers choose: no register spills, and shared memory
within each architecture's limit.

The interpreter that tests/test_kernels.py uses forgives what the GPU compiler refuses (it read a Python
float global that compiled code may not), and it says nothing of registers. The compiler runs in a fresh
process without TRITON_INTERPRET, since a kernel module imported under the interpreter cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from emllm_kernels.compile_check import EXIT_OVER_SHARED_MEMORY


@pytest.fixture(scope="module", params=[90, 80], ids=["sm_90", "sm_80"])
def compiled_rows(request) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "emllm_kernels.compile_check", "--arch", str(request.param), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    # over the shared memory limit: reported by test_shared_memory_within_the_limit, row by row
    assert done.returncode in (0, EXIT_OVER_SHARED_MEMORY), done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_kernel_compiles_in_every_dtype(compiled_rows) -> None:
    compiled = {(row["kernel"], row["dtype"], row["head_dim"]) for row in compiled_rows}
    kernels = ("episodic_attention", "received_mass", "event_scores")
    expected = {(k, dtype, d) for k in kernels for dtype in ("bf16", "fp16", "fp32") for d in (64, 128)}
    assert expected <= compiled, sorted(expected - compiled)
    decoding = [row for row in compiled_rows if row["kernel"] == "episodic_attention" and row["rows"] <= 4]
    assert decoding, "the one-token (decoding) attention block was not compiled"


def test_no_register_spills(compiled_rows) -> None:
    spilled = [row for row in compiled_rows if row["spill_bytes"]]
    assert not spilled, json.dumps(spilled, indent=1)


def test_shared_memory_within_the_limit(compiled_rows) -> None:
    over = [row for row in compiled_rows if not row["fits"]]
    assert not over, json.dumps(over, indent=1)
