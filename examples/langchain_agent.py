"""A LangChain agent over the bundled SmolLM2-135M with episodic memory, a tool, and SQLite checkpoints.

    python examples/langchain_agent.py "What is 17 times 23?"

LangGraph's SqliteSaver keeps the messages of each thread; the episodic session of the thread keeps the
model's memory, so each agent step computes only the messages added since the last one (see the
cache_read counts printed). A 135M model may or may not choose to call the tool: the loop completes
either way.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from langchain.agents import create_agent
from langchain_core.tools import tool
from langgraph.checkpoint.sqlite import SqliteSaver

from emllm_integrations.langchain import ChatEMLLM


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def main() -> None:
    question = " ".join(sys.argv[1:]) or "What is 17 times 23? Use the multiply tool."
    folder = Path.home() / ".cache" / "emllm" / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(folder / "agent_checkpoints.db", check_same_thread=False)
    model = ChatEMLLM(max_tokens=96)  # the bundled default model; no download
    agent = create_agent(
        model,
        tools=[multiply],
        system_prompt="You are a careful assistant. Use tools for arithmetic.",
        checkpointer=SqliteSaver(connection),
    )
    config = {"configurable": {"thread_id": "agent-demo"}}
    state = agent.invoke({"messages": [("user", question)]}, config)
    for message in state["messages"]:
        usage = getattr(message, "usage_metadata", None) or {}
        cached = usage.get("input_token_details", {}).get("cache_read")
        note = f"  [input {usage['input_tokens']} tokens, {cached} from episodic memory]" if usage else ""
        print(f"{message.type:>5}: {message.content or message.tool_calls}{note}")
    connection.close()


if __name__ == "__main__":
    main()
