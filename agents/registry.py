"""Agents by name: ``make_agent("rnd", env, preset="small")``."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from latentrl.agents.base import Agent

__all__ = ["AGENTS", "make_agent", "list_agents"]

# name -> "module:class". Modules are imported lazily so that one agent's dependencies never slow
# down (or break) another's.
AGENTS: dict[str, str] = {
    "rnd": "latentrl.agents.rnd:RNDAgent",
    "td_jepa": "latentrl.agents.td_jepa:TDJEPAAgent",
    "fb": "latentrl.agents.fb:FBAgent",
    "metra": "latentrl.agents.metra:METRAAgent",
    "active_inference": "latentrl.agents.active_inference:ActiveInferenceAgent",
    "stamo": "latentrl.agents.stamo:StaMoAgent",
    "pv_rnn": "latentrl.agents.pv_rnn:PVRNNAgent",
}


def list_agents() -> list[str]:
    return sorted(AGENTS)


def agent_class(name: str) -> type[Agent]:
    if name not in AGENTS:
        close = difflib.get_close_matches(name, AGENTS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown agent {name!r}.{hint} Valid agents: {', '.join(list_agents())}")
    module, cls = AGENTS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_agent(name: str, env, *, preset: str = "paper", device: str = "cpu", **overrides: Any) -> Agent:
    """Build agent ``name`` for ``env`` (a TorchRL ``EnvBase``, or anything with its ``observation_spec`` and
    ``action_spec``: the specs give observation and action shapes).

    ``preset`` is ``"paper"`` (the published setting) or ``"small"`` (trains on a 2-core CPU);
    ``overrides`` set fields of the agent's config dataclass, and an unknown field is an error that
    lists the valid ones.
    """
    return agent_class(name).from_env(env, preset=preset, device=device, **overrides)
