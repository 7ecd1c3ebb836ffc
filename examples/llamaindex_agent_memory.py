"""An agent whose memory outgrows any window: a LlamaIndex FunctionAgent on EM-LLM with an episodic memory.

The conversation grows far past what the model attends at once (SmolLM2-135M here attends ~2k tokens:
64 initial, 1024 retrieved, 1024 local). LlamaIndex's `Memory` keeps only the last turns in its queue
and flushes older ones to `EpisodicMemoryBlock`; because the chat LLM is our EMLLM, flushed turns stay in
its episodic session (read once, kept as events) and nothing is pasted into the prompt. Early in the
chat the user mentions a locker code; many turns later the agent is asked for it.

    python examples/llamaindex_agent_memory.py                 # 24 turns of novel passages in between
    python examples/llamaindex_agent_memory.py --turns 60      # a longer conversation

With --other-llm-demo, the block instead runs beside a stand-in "other" LLM (LlamaIndex's MockLLM) and
pastes the events it recalls: the same block gives any chat model (OpenAI, Ollama, ...) episodic memory.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import emllm
from emllm.tasks import demo_text
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.llms import ChatMessage, MockLLM
from llama_index.core.memory import Memory
from llama_index.core.tools import FunctionTool

from emllm_integrations.llama_index import EMLLM, EpisodicMemoryBlock

FACT = "By the way, my locker code at the library is 73914. Please remember it."
QUESTION = "What is my locker code at the library? Answer with the number."


def today() -> str:
    """Today's date."""
    return "Thursday, 27 November"


def passages(turns: int, chars: int = 1200) -> list[str]:
    text = demo_text()
    intro = "Here is the next passage I am reading:\n"
    return [intro + text[i * chars : (i + 1) * chars] for i in range(turns)]


async def agent_chat(turns: int, max_new_tokens: int) -> None:
    engine = emllm.EMLLM.from_pretrained()
    llm = EMLLM(engine=engine, session_id="reading-club", max_new_tokens=max_new_tokens)
    memory = Memory.from_defaults(
        session_id="reading-club",
        token_limit=1500,  # the agent's prompt never holds more than this; the rest is episodic
        memory_blocks=[EpisodicMemoryBlock(llm=llm)],
        tokenizer_fn=engine.encode,
    )
    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(today)],
        llm=llm,
        system_prompt="You are a friendly reading companion. Reply in one or two sentences.",
    )
    messages = [FACT, *passages(turns), QUESTION]
    for i, message in enumerate(messages):
        started = time.perf_counter()
        output = await agent.run(message, memory=memory)
        usage = output.raw.get("usage", {}) if isinstance(output.raw, dict) else {}
        if i in (0, len(messages) - 1) or i % 8 == 0:
            print(f"\n[turn {i}] user: {' '.join(message.split())[:80]}...")
            print(f"[turn {i}] agent: {(output.response.content or '').strip()[:200]}")
        stats, seconds = llm.session().stats(), time.perf_counter() - started
        print(
            f"  turn {i}: {seconds:5.1f}s, prompt {usage.get('prompt_tokens', 0):,} tokens "
            f"({usage.get('cached_tokens', 0):,} from memory), session {stats.tokens:,} tokens / "
            f"{stats.events:,} events, archived messages {len(llm.archived())}"
        )
    recalled = "73914" in (output.response.content or "")
    print("\nThe locker code is", "recalled" if recalled else "NOT recalled")


async def memory_for_another_llm(turns: int) -> None:
    engine = emllm.EMLLM.from_pretrained()
    block = EpisodicMemoryBlock(engine=engine, top_k=3)
    memory = Memory.from_defaults(
        session_id="other-llm", token_limit=1500, memory_blocks=[block], tokenizer_fn=engine.encode
    )
    for message in [FACT, *passages(turns)]:
        await memory.aput(ChatMessage(role="user", content=message))
        await memory.aput(ChatMessage(role="assistant", content="Noted."))
    prompt = await memory.aget(QUESTION)
    reply = await MockLLM().achat([*prompt, ChatMessage(role="user", content=QUESTION)])
    print(f"the prompt an LLM would get ({sum(len(m.content or '') for m in prompt):,} chars):")
    print(prompt[0].content[:1500])
    print("...\nthe recalled events mention the code:", "73914" in prompt[0].content)
    print(f"(the stand-in LLM's reply: {reply!s:.60})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=24, help="passages between the fact and the question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--other-llm-demo", action="store_true", help="the block beside another chat LLM")
    args = parser.parse_args()
    if args.other_llm_demo:
        asyncio.run(memory_for_another_llm(args.turns))
    else:
        asyncio.run(agent_chat(args.turns, args.max_new_tokens))


if __name__ == "__main__":
    main()
