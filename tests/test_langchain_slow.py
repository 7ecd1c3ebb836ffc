"""The LangChain adapter on the real default model (SmolLM2-135M): an agent loop completes, and forced
tool calls and structured output come back valid. Whether a 135M model picks the tool is not asserted."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from emllm_integrations.langchain import ChatEMLLM, register_engine

pytestmark = pytest.mark.slow


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def smol_model_name(smollm2):
    return register_engine(smollm2, "smollm2-slow-tests")


def test_create_agent_loop_completes(smol_model_name):
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    model = ChatEMLLM(model=smol_model_name, max_tokens=24)
    agent = create_agent(model, tools=[multiply], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "slow-agent"}}
    state = agent.invoke({"messages": [HumanMessage("What is 6 times 7? Use the multiply tool.")]}, config)
    assert isinstance(state["messages"][-1], AIMessage)
    assert "slow-agent" in model.episodic_engine().session_ids()


def test_forced_call_and_structured_output_are_valid(smol_model_name):
    model = ChatEMLLM(model=smol_model_name, max_tokens=30)
    call = model.bind_tools([multiply], tool_choice="multiply").invoke("What is 6 times 7?")
    assert call.tool_calls[0]["name"] == "multiply"
    assert all(isinstance(v, int) for v in call.tool_calls[0]["args"].values())
    city = model.with_structured_output(City).invoke("Paris is the capital of which country?")
    assert isinstance(city, City)
