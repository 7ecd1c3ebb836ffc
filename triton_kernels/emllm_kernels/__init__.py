"""emllm_kernels: Triton kernels for EM-LLM's hot paths, each beside its torch reference.

| kernel               | reference                      | what it computes                                 |
|----------------------|--------------------------------|--------------------------------------------------|
| `episodic_attention` | `episodic_attention_reference` | one softmax over global + local keys -> out, lse |
| `received_mass`      | `received_mass_reference`      | attention mass each local key received           |
| `event_scores`       | `event_scores_reference`       | representatives vs the grouped mean query        |

Importing this package imports neither triton nor CUDA: the jitted kernels load on the first launch, so
it works on a CPU-only machine, and `TRITON_INTERPRET=1` set any time before that launch runs them in
Triton's interpreter on CPU tensors (the tests do). `unavailable_reason` says whether they can run.
`python -m emllm_kernels.compile_check` compiles them for an NVIDIA GPU on a machine without one and
reports registers, spills and shared memory.
Knows nothing about the engine: no configs, no layers, only tensors.
"""

from .backend import KernelUnavailableError, interpreter_requested, triton_installed, unavailable_reason
from .episodic_attention import (
    episodic_attention,
    episodic_attention_reference,
    fold_query_groups,
    unfold_query_groups,
)
from .event_scores import event_scores, event_scores_reference
from .received_mass import received_mass, received_mass_reference

__all__ = [
    "KernelUnavailableError",
    "episodic_attention",
    "episodic_attention_reference",
    "event_scores",
    "event_scores_reference",
    "fold_query_groups",
    "interpreter_requested",
    "received_mass",
    "received_mass_reference",
    "triton_installed",
    "unavailable_reason",
    "unfold_query_groups",
]
