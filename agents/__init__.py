"""Agents: the learner / policy contracts and ``make_agent`` (DESIGN.md, "agents — learner and policy, split").

Agent modules (``latentrl.agents.rnd``, ...) are imported lazily by :func:`make_agent`; model
directories are written and read by :mod:`latentrl.agents.model_files`.
"""

from latentrl.agents.base import (
    Agent,
    GoalObservation,
    Policy,
    RewardSamples,
    SampleSpec,
    Task,
    UniformRandomPolicy,
    UnsupportedTaskError,
    config_from_preset,
    resolve_device,
    sample_batches,
)
from latentrl.agents.registry import AGENTS, agent_class, list_agents, make_agent

__all__ = [
    "AGENTS",
    "Agent",
    "GoalObservation",
    "Policy",
    "RewardSamples",
    "SampleSpec",
    "Task",
    "UniformRandomPolicy",
    "UnsupportedTaskError",
    "agent_class",
    "config_from_preset",
    "list_agents",
    "make_agent",
    "resolve_device",
    "sample_batches",
]
