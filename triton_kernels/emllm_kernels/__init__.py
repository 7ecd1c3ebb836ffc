"""emllm_kernels: Triton kernels for EM-LLM's hot paths, each beside its torch reference.

Empty until the kernels land (issue 3); the engine's torch path in `emllm.attention` is the reference.
"""
