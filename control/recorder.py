"""Every control step as a replay dataset that ``train_agent.py data=<dir>`` reads (robot data trains agents)."""

from __future__ import annotations

from pathlib import Path

import torch
from tensordict import TensorDict
from torch import Tensor

from latentrl.replay.buffer import ReplayBuffer

__all__ = ["Recorder"]

OBS_KEYS = ("pixels", "state", "physics")


class Recorder:
    """Collects control steps as ``ReplayBuffer`` rows and saves them as a dataset.

    Row ``t`` holds the observation the policy acted on, ``action`` as ``send_action`` returned it,
    ``("next", obs)`` and ``("next", "reward")`` from the next tick's observation (so it is written at
    ``t + 1``), ``terminated`` False, ``truncated`` at an episode end or a stop, ``episode``, ``step``
    and extras ``control.{raw_action, fault, loop_latency_ms, obs_age_ms, fallback}`` (the raw action
    with non-finite values zeroed; ``fault`` tells which rows to trust: filter on ``control.fault == 0``).

    A tick without a usable observation (none, malformed or non-finite) cannot be stored: it ends the
    segment (the previous row is marked truncated). Rows stay in memory and go to ``extend`` at
    segment ends, outside the timed ticks; :meth:`save` writes the dataset.
    """

    def __init__(self, path: str | Path, capacity: int = 100_000, *, domain: str | None = None,
                 obs_keys: tuple[str, ...] = OBS_KEYS):
        self.path = Path(path)
        self.buffer = ReplayBuffer(capacity, domain=domain)
        self.obs_keys = obs_keys
        self._rows: list[dict] = []
        self._pending: dict | None = None
        self._episode = 0
        self._step = 0
        self.num_steps = 0

    def add(self, obs: TensorDict | None, action: Tensor, *, raw_action: Tensor | None, fault: int,
            loop_latency_ms: float, obs_age_ms: float, fallback: bool) -> None:
        """One tick: ``obs`` the observation acted on (``None`` when the tick had no usable one)."""
        if obs is None:
            self.end_segment()
            return
        current = {k: obs[k] for k in self.obs_keys if k in obs.keys()}
        if self._pending is not None:
            row = self._pending
            row["next"] = current
            reward = obs.get("reward", None)
            row["reward"] = float("nan") if reward is None else float(reward)
            self._rows.append(row)
        raw = torch.zeros_like(action) if raw_action is None else torch.nan_to_num(
            raw_action.reshape(action.shape).float(), nan=0.0, posinf=0.0, neginf=0.0)
        self._pending = {"obs": current, "action": action.float().clone(), "raw_action": raw,
                         "fault": int(fault), "loop_latency_ms": float(loop_latency_ms),
                         "obs_age_ms": float(obs_age_ms), "fallback": bool(fallback)}

    def end_segment(self) -> None:
        """End the running segment (episode end, stop, a tick without an observation) and store its rows."""
        self._pending = None
        rows, self._rows = self._rows, []
        if not rows:
            return
        n = len(rows)
        keys = [k for k in rows[0]["obs"] if all(k in r["obs"] and k in r["next"] for r in rows)]
        truncated = torch.zeros(n, 1, dtype=torch.bool)
        truncated[-1] = True
        td = TensorDict({
            **{k: torch.stack([r["obs"][k] for r in rows]) for k in keys},
            "action": torch.stack([r["action"] for r in rows]),
            "episode": torch.full((n,), self._episode, dtype=torch.int64),
            "step": torch.arange(self._step, self._step + n, dtype=torch.int64),
            "control": {
                "raw_action": torch.stack([r["raw_action"] for r in rows]),
                "fault": torch.tensor([r["fault"] for r in rows], dtype=torch.int64),
                "loop_latency_ms": torch.tensor([r["loop_latency_ms"] for r in rows], dtype=torch.float32),
                "obs_age_ms": torch.tensor([r["obs_age_ms"] for r in rows], dtype=torch.float32),
                "fallback": torch.tensor([r["fallback"] for r in rows], dtype=torch.bool),
            },
            "next": {
                **{k: torch.stack([r["next"][k] for r in rows]) for k in keys},
                "reward": torch.tensor([[r["reward"]] for r in rows], dtype=torch.float32),
                "terminated": torch.zeros(n, 1, dtype=torch.bool),
                "truncated": truncated,
                "done": truncated.clone(),
            },
        }, batch_size=[n])
        td["control", "obs_age_ms"] = torch.nan_to_num(td["control", "obs_age_ms"], nan=-1.0)
        td["control", "loop_latency_ms"] = torch.nan_to_num(td["control", "loop_latency_ms"], nan=-1.0)
        self.buffer.extend(td.unsqueeze(0))
        self.num_steps += n
        self._episode += 1
        self._step = 0

    def save(self, overwrite: bool = False) -> Path:
        """End the running segment and write the dataset to ``path`` (``ReplayBuffer.save``)."""
        self.end_segment()
        if len(self.buffer) == 0:
            raise ValueError(f"no control steps were recorded, so there is no dataset to write to {self.path}")
        self.buffer.save(self.path, overwrite=overwrite)
        return self.path
