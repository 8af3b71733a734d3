"""The one training loop: online (collect -> buffer -> update) or offline (dataset -> update).

Agents never own a loop; they expose ``sample_spec``, ``update`` and ``policy`` and this module
drives them, evaluates them with videos, logs, and checkpoints atomically so that ``resume=true``
continues a killed run.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from latentrl.agents import make_agent
from latentrl.agents.base import Agent, Policy, resolve_device, sample_batches
from latentrl.agents.model_files import save_model
from latentrl.envs import make_env
from latentrl.replay import ReplayBuffer
from latentrl.training.checkpoint import load_checkpoint, restore_agent, save_checkpoint
from latentrl.training.evaluation import RolloutResult, evaluate_agent, rollout
from latentrl.training.logger import RunLogger, write_video

__all__ = ["Trainer", "NonFiniteLossError", "EvalResult", "evaluate_policy", "resolve_device", "seed_everything"]


# Settings a resumed run must share with the run that wrote the checkpoint: they shape the networks
# (agent, preset, its overrides, observations) or the saved replay buffer (env streams, capacity).
RESUME_MUST_MATCH = ("agent.name", "agent.preset", "agent.overrides", "env.task", "env.num_envs", "env.obs",
                     "env.image_size", "env.action_repeat", "buffer_capacity", "data")


class NonFiniteLossError(FloatingPointError):
    """An update produced a NaN or infinite loss; training stops instead of continuing silently."""


class GracefulStop:
    """Within the block, the first SIGINT (Ctrl-C) or SIGTERM only sets ``requested``; a second SIGINT aborts.

    The training loop checks ``requested`` between steps, so a stopped run ends on a whole step with a
    checkpoint, instead of dying inside an update or a buffer write (schedulers send SIGTERM before killing).
    Outside the main thread signals cannot be caught, and the block changes nothing.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n[latentrl] {self.requested}: stopping after this step and saving a checkpoint "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


EvalResult = RolloutResult
"""What :func:`evaluate_policy` returns (``returns``, ``lengths``, ``mean_return``, ``frames``, ``episodes``)."""


def evaluate_policy(env, policy: Policy, episodes: int, *, record: bool = False,
                    reward_fn=None) -> RolloutResult:
    """Run ``episodes`` full episodes of ``policy`` on ``env`` (all its envs in parallel): the one
    :func:`~latentrl.training.evaluation.rollout`, named for the trainer's use.

    ``reward_fn`` (a task from ``get_task``) replaces the env's own reward, computed from
    ``("next", "physics")``; otherwise the env's reward is summed. ``record`` keeps the first
    episode's frames.
    """
    return rollout(env, policy, episodes, video=record, reward_task=reward_fn)


def _check_finite(metrics: dict[str, float], update: int, env_steps: int) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        raise NonFiniteLossError(
            f"non-finite values at update {update} (env step {env_steps}): "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + ". Training stopped; the last checkpoint holds the state before this update. Lower the "
            "learning rate, check the inputs, or resume from the checkpoint with another seed."
        )


class Trainer:
    """Builds env, buffer and agent from a run config and trains, evaluates, logs and checkpoints."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, *, agent_overrides: dict[str, Any] | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed image and batch shapes: let cuDNN pick its fastest convs
        torch.set_num_threads(_resolve_threads(cfg.get("threads", "auto")))
        self.offline = cfg.data is not None
        seed_everything(cfg.seed)
        self.agent_overrides = dict(agent_overrides or {})
        e = cfg.env
        obs = tuple(e.obs)
        # MuJoCo Warp steps and renders on the learner's device; dm_control always on the CPU.
        env_device = str(self.device) if e.backend == "mjwarp" else "cpu"
        self.env = make_env(e.task, obs=obs, image_size=e.image_size, camera=e.camera,
                            action_repeat=e.action_repeat, num_envs=1 if self.offline else e.num_envs,
                            backend=e.backend, device=env_device, seed=cfg.seed, floor=e.floor,
                            episode_length=e.episode_length, num_workers=0 if self.offline else e.num_workers)
        eval_obs = tuple(dict.fromkeys((*obs, "pixels"))) if cfg.eval.video else obs
        self.eval_env = make_env(e.task, obs=eval_obs, image_size=e.image_size, camera=e.camera,
                                 action_repeat=e.action_repeat, num_envs=int(cfg.eval.get("num_envs", 1)),
                                 backend=e.backend, device=env_device,
                                 seed=cfg.seed + 10_000, floor=e.floor, episode_length=e.episode_length,
                                 num_workers=0)
        self.agent: Agent = make_agent(cfg.agent.name, self.env, preset=cfg.agent.preset,
                                       device=str(self.device), **self.agent_overrides)
        self.buffer = self.make_buffer()
        self.spec = self.agent.sample_spec()
        self.env_steps = 0
        self.updates = 0
        self.episodes = 0
        self.checkpoint_path = self.run_dir / "checkpoints" / "latest.pt"
        self.model_path = self.run_dir / "model"
        self.logger = RunLogger(self.run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                                config=OmegaConf.to_container(cfg, resolve=True))
        if cfg.resume and self.checkpoint_path.exists():
            self._resume()

    def make_buffer(self) -> ReplayBuffer:
        """The run's replay buffer: the dataset (offline) or an empty buffer of ``buffer_capacity`` rows.

        Built before a resume restores its contents, so a subclass that overrides this gets its own
        buffer type back from the checkpoint.
        """
        if self.offline:
            return ReplayBuffer.load(self.cfg.data, device=self.device)
        _check_buffer_fits(self.cfg.buffer_capacity, self.env)
        return ReplayBuffer(self.cfg.buffer_capacity, device=self.device)

    # --------------------------------------------------------------------------------- checkpoints
    def _config_dict(self) -> dict:
        out = OmegaConf.to_container(self.cfg, resolve=True)
        out["agent"]["overrides"] = dict(self.agent_overrides)
        return out

    def save(self) -> Path:
        """The checkpoint (``checkpoints/latest.pt``, to resume) and the model directory (``model/``, to use)."""
        buffer_state = None if self.offline else self.buffer.state_dict()
        config = self._config_dict()
        keep = self.cfg.keep_checkpoints
        path = save_checkpoint(self.checkpoint_path, self.agent,
                               counters={"env_steps": self.env_steps, "updates": self.updates,
                                         "episodes": self.episodes},
                               config=config, buffer_state=buffer_state,
                               keep_as=f"{self.current:09d}.pt" if keep else None)
        extra = {"step": self.current, "env_steps": self.env_steps, "updates": self.updates, "data": config.get("data"),
                 "run_dir": str(self.run_dir), "preset": config["agent"]["preset"]}
        save_model(self.model_path, self.agent, env=config["env"], extra=extra)
        if keep:
            save_model(self.checkpoint_path.with_name(f"{self.current:09d}.model"), self.agent, env=config["env"],
                       extra=extra)
        return path

    def _resume(self) -> None:
        payload = load_checkpoint(self.checkpoint_path)  # also restores the RNG states
        self._check_resume_config(payload.get("config") or {})
        restore_agent(payload, self.agent, self.checkpoint_path)
        counters = payload["counters"]
        self.env_steps, self.updates, self.episodes = counters["env_steps"], counters["updates"], counters["episodes"]
        if payload["buffer"] is not None and not self.offline:
            self.buffer.load_state_dict(payload["buffer"])
            self.buffer.end_episodes()
        # Rows the lost stretch after the checkpoint logged would be logged again: metrics.csv keeps one history.
        dropped = self.logger.drop_rows_after(self.current)
        if dropped:
            print(f"[latentrl] metrics.csv: dropped {dropped} rows logged after the checkpoint's step {self.current}")
        # Episodes in flight when the run stopped are lost; the env starts fresh ones with new ids.
        self.env.set_seed(self.cfg.seed + 1_000_003 * (self.env_steps + 1))
        print(f"[latentrl] resumed from {self.checkpoint_path} at env step {self.env_steps}, update {self.updates}")

    def _check_resume_config(self, saved: dict) -> None:
        """Refuse to resume with settings that change the networks or the replay buffer's layout."""
        current = self._config_dict()

        def get(cfg: dict, key: str):
            for part in key.split("."):
                cfg = cfg.get(part) if isinstance(cfg, dict) else None
            return cfg

        differ = [(k, get(saved, k), get(current, k)) for k in RESUME_MUST_MATCH
                  if get(saved, k) is not None and get(saved, k) != get(current, k)]
        if differ:
            def arg(key, value) -> str:
                if isinstance(value, dict):  # agent.overrides: one agent.<field>=v each
                    return " ".join(f"agent.{f}={v}" for f, v in value.items()) or "(no agent.<field>=... overrides)"
                return f"{key}=[{','.join(map(str, value))}]" if isinstance(value, list) else f"{key}={value}"

            fix = " ".join(arg(k, v) for k, v, _ in differ)
            raise ValueError(f"cannot resume {self.checkpoint_path}: the run was started with other settings ("
                             + "; ".join(f"{k}: {v!r} there, {c!r} now" for k, v, c in differ)
                             + f"). Resume with the run's settings: {fix}")

    # ----------------------------------------------------------------------------------------- loop
    def _update(self) -> dict[str, float]:
        batch = sample_batches(self.buffer, self.spec)
        metrics = self.agent.update(batch)
        self.updates += 1
        _check_finite(metrics, self.updates, self.env_steps)
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        cfg = self.cfg.eval
        self.agent.eval()
        try:
            result = rollout(self.eval_env, self.agent.policy(explore=False), cfg.episodes, video=cfg.video)
            # Agent-specific evaluations (METRA's coverage) registered in latentrl.training.evaluation.
            extra = evaluate_agent(self.agent, self.eval_env, step=step, out_dir=self.run_dir / "eval")
        finally:
            self.agent.train()
        metrics = {"eval/return": result.mean_return, "eval/episode_length": float(np.mean(result.lengths))}
        metrics.update({f"eval/{k}": float(v) for k, v in extra.items()})
        if cfg.video and result.frames is not None:
            path = write_video(self.run_dir / "videos" / f"eval_{step:09d}.mp4", result.frames, fps=cfg.video_fps)
            self.last_video = path
        return metrics

    def train(self) -> dict[str, float]:
        """Run until ``cfg.steps`` (env steps online, updates offline); returns the last eval metrics."""
        cfg = self.cfg
        total = cfg.steps
        unit = "updates" if self.offline else "env steps"
        progress = tqdm(total=total, initial=self.updates if self.offline else self.env_steps, unit=unit,
                        dynamic_ncols=True, disable=not cfg.log.progress, mininterval=1.0)
        last_eval: dict[str, float] = {}
        last_eval_at = None
        next_eval = _next_multiple(self.current, cfg.eval.every) if self.current > 0 else 0
        next_log = _next_multiple(self.current, cfg.log.every)
        next_ckpt = _next_multiple(self.current, cfg.checkpoint_every)
        metrics: dict[str, float] = {}
        started, start_count = time.time(), self.current
        self.stopped_by: str | None = None  # the signal that stopped this run early, if one did
        try:
            if self.offline:
                loop = self._offline_steps()
            else:
                loop = self._online_steps()
            with GracefulStop() as stop:
                for step_metrics in loop:
                    metrics.update(step_metrics)
                    progress.update(self.current - progress.n)
                    if self.current >= next_log:
                        rate = (self.current - start_count) / max(time.time() - started, 1e-9)
                        self.logger.log(self.current, {**metrics, "updates": self.updates, "env_steps": self.env_steps,
                                                         f"{unit.replace(' ', '_')}_per_s": rate})
                        progress.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:3]})
                        next_log = _next_multiple(self.current, cfg.log.every)
                    if self.current >= next_eval and cfg.eval.every > 0:
                        last_eval, last_eval_at = self.evaluate(self.current), self.current
                        self.logger.log(self.current, last_eval)
                        next_eval = _next_multiple(self.current, cfg.eval.every)
                    if self.current >= next_ckpt:
                        self.save()
                        next_ckpt = _next_multiple(self.current, cfg.checkpoint_every)
                    if self.current >= total or stop.requested:
                        break
            self.stopped_by = stop.requested
            progress.n = self.current
            progress.close()
            at_end = (cfg.eval.every > 0 or cfg.eval.at_end) and last_eval_at != self.current  # not twice at one step
            if at_end and self.stopped_by is None:
                last_eval = self.evaluate(self.current)
                self.logger.log(self.current, last_eval)
            self.save()
            if self.stopped_by is not None:
                print(f"[latentrl] stopped by {self.stopped_by} at {self.current} {unit}; checkpoint saved. Continue "
                      f"with resume=true run_dir={self.run_dir}", file=sys.stderr, flush=True)
        finally:
            progress.close()
            self.logger.close()
        return last_eval

    @property
    def current(self) -> int:
        return self.updates if self.offline else self.env_steps

    def _offline_steps(self):
        while True:
            yield self._update()

    def _online_steps(self):
        cfg = self.cfg
        env, agent = self.env, self.agent
        policy = agent.policy(explore=True)
        td = env.reset()
        n = env.batch_size[0]
        carry = policy.init_carry(n)
        is_first = torch.ones(n, dtype=torch.bool)
        update_debt = 0.0
        while True:
            obs = td.exclude("action", "next")
            action, carry = policy.step(obs, carry, is_first)
            td["action"] = action
            for key, value in policy.extras(carry).items():
                td[key] = value.to(action.device)
            td, td_next = env.step_and_maybe_reset(td)
            self.buffer.extend(td)
            is_first = td["next", "done"].reshape(-1).cpu()
            if is_first.any():
                self.episodes += int(is_first.sum())
            self.env_steps += n
            agent.env_steps = self.env_steps
            metrics: dict[str, float] = {}
            if self.env_steps >= cfg.learning_starts and len(self.buffer) > 0:
                update_debt += n * cfg.updates_per_step
                while update_debt >= 1:
                    metrics = self._update()
                    update_debt -= 1
            td = td_next
            yield metrics


def _check_buffer_fits(capacity: int, env) -> None:
    """Refuse a replay capacity whose storage would not fit in memory (it is allocated on first write)."""
    row = sum(int(np.prod(spec.shape[1:])) * spec.dtype.itemsize for spec in env.observation_spec.values())
    row += int(np.prod(env.action_spec.shape[1:])) * 4 + 16
    need = capacity * row
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > 0.8 * available:
        raise MemoryError(
            f"buffer_capacity={capacity} needs about {need / 2**30:.1f} GiB ({row} bytes per step) but only "
            f"{available / 2**30:.1f} GiB of memory is free; lower buffer_capacity (e.g. "
            f"buffer_capacity={int(0.5 * available / row)})"
        )


def _resolve_threads(threads) -> int:
    if threads == "auto":
        return max(1, (os.cpu_count() or 2) // 2)
    return int(threads)


def _next_multiple(x: int, every: int) -> int:
    if every <= 0:
        return 1 << 62
    return (x // every + 1) * every
