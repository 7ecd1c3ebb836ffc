"""emllm_integrations: thin LangChain and LlamaIndex adapters over the `emllm` engine."""
