"""A persistent chatbot: run it twice and it remembers, without re-reading the conversation.

    python examples/langchain_chatbot.py "My name is Elizabeth and I live at Longbourn."
    python examples/langchain_chatbot.py "Where do I live?"

Two stores work together: LangGraph's SqliteSaver keeps the messages of the thread, and the episodic
session store keeps the model's memory of them (keys and values, events), so after a restart the next
turn computes only the new message (the printed cache_read is the part served from memory).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import START, MessagesState, StateGraph

from emllm_integrations.langchain import ChatEMLLM

FOLDER = Path.home() / ".cache" / "emllm" / "examples"
THREAD = {"configurable": {"thread_id": "chatbot"}}


def build(model: ChatEMLLM, checkpointer: SqliteSaver):
    def respond(state: MessagesState) -> dict:
        return {"messages": [model.invoke(state["messages"])]}  # the thread id reaches the model

    graph = StateGraph(MessagesState)
    graph.add_node("respond", respond)
    graph.add_edge(START, "respond")
    return graph.compile(checkpointer=checkpointer)


def main() -> None:
    text = " ".join(sys.argv[1:]) or "Hello! Please remember that my favourite novel is Emma."
    FOLDER.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(FOLDER / "chatbot_checkpoints.db", check_same_thread=False)
    model = ChatEMLLM(max_tokens=80, store=FOLDER / "sessions")  # sessions saved after every turn
    chatbot = build(model, SqliteSaver(connection))
    state = chatbot.invoke({"messages": [("user", text)]}, THREAD)
    reply = state["messages"][-1]
    usage = reply.usage_metadata
    print(reply.content)
    print(
        f"[{len(state['messages'])} messages in the thread; input {usage['input_tokens']} tokens, "
        f"{usage['input_token_details']['cache_read']} served from episodic memory]"
    )
    connection.close()


if __name__ == "__main__":
    main()
