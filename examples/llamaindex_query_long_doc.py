"""Questions about a whole novel held in episodic memory: LlamaIndex's EpisodicQueryEngine over EM-LLM.

The novel is read once, start to end, by the model itself (no chunking, no embeddings); every answer
attends to the events its question retrieves, and each answer lists them as source nodes with their
place in the book. With a session store the reading survives the process: run it twice and the second
run answers at once.

    python examples/llamaindex_query_long_doc.py                        # all of Pride and Prejudice
    python examples/llamaindex_query_long_doc.py --tokens 60000 --plant  # 60k tokens, a planted fact
    python examples/llamaindex_query_long_doc.py --question "Who is Mr. Darcy?"

Reading costs about 150 tokens/s with SmolLM2-135M on 2 CPU cores (the whole novel, ~160k tokens, in
about 20 minutes); much faster on a GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import emllm
from emllm.tasks import demo_text, fill_to_tokens
from llama_index.core import Document

from emllm_integrations.llama_index import EMLLM, EpisodicQueryEngine

NOVEL = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "austen_pride_and_prejudice.txt"
FACT = "\n\nThe secret code of the Longbourn library is 73914. Remember it. 73914 is the secret code.\n\n"
FACT_QUESTION = "What is the secret code of the Longbourn library?"
QUESTIONS = ["Who does Elizabeth Bennet marry?", "Where does Mr. Bingley live?"]


def load_novel(tokenizer, tokens: int | None, plant: bool) -> str:
    text = NOVEL.read_text(encoding="utf-8") if NOVEL.exists() else demo_text()
    if tokens:
        text = fill_to_tokens(tokenizer, text, tokens)
    if plant:  # a fact the model cannot know, 40% of the way in: recall must come from memory
        at = text.find("\n\n", int(len(text) * 0.4))
        text = text[:at] + FACT + text[at:]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=emllm.DEFAULT_MODEL, help="HF id, local path or .gguf")
    parser.add_argument("--tokens", type=int, default=None, help="read only this many tokens of the novel")
    parser.add_argument("--plant", action="store_true", help=f"plant a fact and ask: {FACT_QUESTION!r}")
    parser.add_argument("--question", action="append", help="a question (repeatable)")
    parser.add_argument("--store", default=None, help="session store folder (default: $EMLLM_HOME/sessions)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    started = time.perf_counter()
    engine = emllm.EMLLM.from_pretrained(args.model, store=emllm.SessionStore(args.store))
    llm = EMLLM(engine=engine, max_new_tokens=args.max_new_tokens)
    text = load_novel(engine.tokenizer, args.tokens, args.plant)
    document = Document(text=text, id_="pride-and-prejudice", metadata={"title": "Pride and Prejudice"})
    print(f"model loaded in {time.perf_counter() - started:.1f}s; the document is {len(text):,} characters")

    started = time.perf_counter()
    query_engine = EpisodicQueryEngine.from_documents([document], llm=llm, similarity_top_k=3)
    session = engine.session(query_engine.session_id)
    stats = session.stats()
    print(
        f"session {session.id!r}: {stats.tokens:,} tokens in {stats.events:,} events "
        f"(mean {stats.mean_event_size:.0f} tokens), ready in {time.perf_counter() - started:.1f}s"
    )

    questions = args.question or ([FACT_QUESTION] if args.plant else []) + QUESTIONS
    for question in questions:
        started = time.perf_counter()
        response = query_engine.query(question)
        print(f"\nQ: {question}\nA: {response.response.strip()}   ({time.perf_counter() - started:.1f}s)")
        for source in response.source_nodes:
            node = source.node
            if node.metadata["memory"] == "event":
                excerpt = " ".join(node.text.split())[:90]
                where = f"chars {node.start_char_idx:,}-{node.end_char_idx:,}"
                print(f"   event at {where} (score {source.score:+.2f}): {excerpt}")
    engine.close()


if __name__ == "__main__":
    main()
