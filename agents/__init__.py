"""Agents: the Agent / Policy / Task protocols and ``make_agent`` (DESIGN.md, "agents — one protocol").

Agent modules (``latentrl.agents.rnd``, ...) are imported lazily by :func:`make_agent`.
"""

from latentrl.agents.base import (
    Agent,
    FrameStack,
    GoalObservation,
    Policy,
    RewardSamples,
    SampleSpec,
    Task,
    UnsupportedTaskError,
    config_from_preset,
)
from latentrl.agents.registry import AGENTS, agent_class, list_agents, make_agent

__all__ = [
    "AGENTS",
    "Agent",
    "FrameStack",
    "GoalObservation",
    "Policy",
    "RewardSamples",
    "SampleSpec",
    "Task",
    "UnsupportedTaskError",
    "agent_class",
    "config_from_preset",
    "list_agents",
    "make_agent",
]
