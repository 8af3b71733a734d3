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
from torch import Tensor
from tqdm import tqdm

from latentrl.agents import make_agent
from latentrl.agents.base import Agent, resolve_device, sample_batches
from latentrl.agents.model_files import save_model
from latentrl.envs import make_env
from latentrl.replay import ReplayBuffer
from latentrl.training import distributed
from latentrl.training.checkpoint import (
    capture_rng,
    load_checkpoint,
    load_plain,
    restore_agent,
    restore_rng,
    save_atomic,
    save_checkpoint,
)
from latentrl.training.evaluation import evaluate_agent, rollout
from latentrl.training.logger import RunLogger, write_video
from latentrl.world_models.encoders import set_channels_last
from latentrl.world_models.layers import adam_implementation, compile_networks

__all__ = ["Trainer", "NonFiniteLossError", "resolve_device", "seed_everything"]


# Settings a resumed run must share with the run that wrote the checkpoint: they shape the networks
# (agent, preset, its overrides, observations) or the saved replay buffer (env streams, capacity).
RESUME_MUST_MATCH = ("agent.name", "agent.preset", "agent.overrides", "env.task", "env.num_envs", "env.obs",
                     "env.image_size", "env.action_repeat", "buffer_capacity", "data", "collector.kind",
                     "collector.workers")


class NonFiniteLossError(FloatingPointError):
    """An update produced a NaN or infinite loss; training stops instead of continuing silently."""


class GracefulStop:
    """Within the block, the first SIGINT (Ctrl-C) or SIGTERM only sets ``requested``; a second SIGINT aborts.

    The training loop checks ``requested`` between steps, so a stopped run ends on a whole step with a
    checkpoint, instead of dying inside an update or a buffer write (schedulers send SIGTERM before killing).
    Outside the main thread signals cannot be caught, and the block changes nothing; nor does it under
    data-parallel training, where the ranks would see the signal at different steps and stop out of step
    with each other's collectives: there a signal stops the job at once and ``resume=true`` continues it
    from the last (atomic) checkpoint.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread() and distributed.current() is None:
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


def _check_finite(metrics: dict[str, float], update: int, env_steps: int, *, agent: Agent | None = None,
                  batch=None, inputs: list[str] | None = None, checked_at: int | None = None) -> None:
    """Raise :class:`NonFiniteLossError` when a metric of update ``update`` is NaN or infinite, naming it, the first
    non-finite parameter (as of update ``checked_at`` when later) and the non-finite inputs (``inputs``, or those of
    ``batch``)."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if bad:
        raise NonFiniteLossError(
            f"non-finite values at update {update} (env step {env_steps}): "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + _diagnosis(agent, batch, inputs=inputs, after=checked_at if checked_at != update else None)
            + ". Training stopped; the last checkpoint holds the state before this update. Lower the "
            "learning rate, check the inputs, or resume from the checkpoint with another seed."
        )


def first_non_finite_parameter(agent: Agent) -> str | None:
    """The name of the first parameter or floating-point buffer of ``agent`` holding a NaN or an infinity,
    with how many of its values do; ``None`` when all are finite (one host sync)."""
    tensors = [(k, v) for k, v in agent.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, value in tensors:
        by_device.setdefault(value.device, []).append(torch.isfinite(value).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return None
    for name, value in tensors:  # only after a failure: find the first bad one
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            return f"{name} ({bad} of {value.numel()} values non-finite)"
    return None


def _non_finite_input_counts(batch) -> tuple[list[str], Tensor | None]:
    """The floating-point keys of a sampled batch and how many NaN / infinite values each holds ``[K]`` (int64, on
    the batch's device; no host sync). Rewards are left out: those of reward-free data are NaN by design."""
    names, counts = [], []
    if batch is None:
        return names, None
    for key, value in batch.items(include_nested=True, leaves_only=True):
        name = key if isinstance(key, str) else ".".join(key)
        if name.split(".")[-1] == "reward" or not torch.is_tensor(value) or not value.is_floating_point():
            continue
        names.append(name)
        counts.append((~torch.isfinite(value)).sum())
    return names, (torch.stack(counts) if counts else None)


def _non_finite_inputs(batch) -> list[str]:
    """Keys of a sampled batch holding NaN or infinite values, with their counts (one host sync)."""
    names, counts = _non_finite_input_counts(batch)
    if counts is None:
        return []
    return [f"{name} ({count} values)" for name, count in zip(names, counts.tolist(), strict=True) if count]


def _diagnosis(agent: Agent | None, batch, *, inputs: list[str] | None = None, after: int | None = None) -> str:
    """What a failed update's error adds: the first non-finite parameter (``after`` a later update when the
    check runs later than the update), and non-finite inputs if any (``inputs``, else read from ``batch``)."""
    out = ""
    param = first_non_finite_parameter(agent) if agent is not None else None
    if param:
        out += f"; first non-finite parameter{'' if after is None else f' after update {after}'}: {param}"
    inputs = _non_finite_inputs(batch) if inputs is None else inputs
    if inputs:
        out += (f"; the sampled batch held non-finite observations: {', '.join(inputs)} (the data is damaged: "
                "check the dataset or the env)")
    return out


LEARNER_DEFAULTS = {"adam": "auto", "channels_last": "auto", "compile": False, "amp": None}
LEARNER_CHOICES = {"adam": ("auto", "fused", "foreach", "loop"), "channels_last": ("auto", True, False),
                   "compile": (False, True, "default", "reduce-overhead", "max-autotune",
                               "max-autotune-no-cudagraphs"),
                   "amp": (None, "bf16")}


def learner_options(cfg: DictConfig) -> dict[str, Any]:
    """The run's ``learner.*`` speed options (configs/train.yaml), defaults filled in for run configs without
    them; a value outside its choices is a ``ValueError`` naming them.

    ``adam`` (:func:`~latentrl.world_models.layers.make_adam`), ``channels_last``
    (:func:`~latentrl.world_models.encoders.set_channels_last`), ``compile``
    (:func:`~latentrl.world_models.layers.compile_networks`; ``true`` = ``reduce-overhead``, CUDA graphs, on CUDA
    and ``default`` elsewhere) and ``amp`` (``bf16``: bfloat16 autocast around ``update``). Only the exact ones are
    on by default (docs/bench_learner.md; tests/test_learner_speed.py).
    """
    given = OmegaConf.select(cfg, "learner", default=None) or {}
    given = OmegaConf.to_container(given, resolve=True) if OmegaConf.is_config(given) else dict(given)
    unknown = sorted(set(given) - set(LEARNER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown learner option(s) {', '.join(unknown)}; valid: {', '.join(LEARNER_DEFAULTS)}")
    out = {**LEARNER_DEFAULTS, **given}
    for key, choices in LEARNER_CHOICES.items():
        value = out[key]
        if isinstance(value, str) and value.lower() in ("true", "false", "null", "none"):
            value = {"true": True, "false": False}.get(value.lower())
        if not any(value == choice and type(value) is type(choice) for choice in choices):
            shown = " | ".join("null" if c is None else str(c).lower() if isinstance(c, bool) else c for c in choices)
            raise ValueError(f"learner.{key}={out[key]!r} is not one of {shown}; e.g. "
                             f"learner.{key}={choices[1] if choices[0] is None else choices[0]}")
        out[key] = value
    return out


class PendingMetrics:
    """The metrics of the updates since they were last read, kept on the device: ``append`` after each update
    costs no host sync; ``read`` copies all of them to the host at once (one sync) and raises
    :class:`NonFiniteLossError` at the first update with a NaN or infinite metric, naming its update number, env
    step, the non-finite inputs of its batch (counted on the device at the update) and the first non-finite
    parameter. The trainer reads them at each log row, before each evaluation and save, and every
    ``MAX_PENDING`` updates."""

    MAX_PENDING = 1000

    def __init__(self, device: torch.device):
        self.device = device
        self._rows: list[tuple[int, int, tuple[str, ...], list[str], Tensor]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, update: int, env_steps: int, metrics: dict[str, Tensor | float], batch=None) -> None:
        """Keep update ``update``'s metrics (tensors or floats) with its batch's non-finite input counts."""
        values = [v.detach().reshape(()).to(self.device, torch.float32) if torch.is_tensor(v)
                  else torch.tensor(float(v), device=self.device) for v in metrics.values()]
        names, counts = _non_finite_input_counts(batch)
        if counts is not None:
            values.append(counts.to(self.device, torch.float32))
        row = torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0, device=self.device)
        self._rows.append((update, env_steps, tuple(metrics), names, row))

    def read(self, agent: Agent | None = None) -> dict[str, float]:
        """The last update's metrics as floats (``{}`` when none is pending); checks every pending update."""
        if not self._rows:
            return {}
        rows, self._rows = self._rows, []
        flat = torch.cat([row for *_, row in rows]).tolist()  # the one host sync
        last_update = rows[-1][0]
        offset, metrics = 0, {}
        for update, env_steps, keys, input_names, row in rows:
            values = flat[offset:offset + row.numel()]
            offset += row.numel()
            metrics = dict(zip(keys, values[:len(keys)], strict=True))
            counts = values[len(keys):]
            inputs = [f"{name} ({int(c)} values)" for name, c in zip(input_names, counts, strict=True) if c]
            _check_finite(metrics, update, env_steps, agent=agent, inputs=inputs, checked_at=last_update)
        return metrics


class Trainer:
    """Builds env, buffer and agent from a run config and trains, evaluates, logs and checkpoints."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, *, agent_overrides: dict[str, Any] | None = None,
                 finished_ok: bool = False):
        """``finished_ok``: resuming a run that already reached ``cfg.steps`` is allowed (collect_dataset.py then
        only writes the dataset); otherwise it is an error, since nothing is left to train."""
        from latentrl.training.cli import check_train_config

        check_train_config(cfg)  # ranges and types, before anything is built
        self.learner = learner_options(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        # Data-parallel (torchrun; training/distributed.py): rank r trains on its share of every batch with its
        # own seed and envs; rank 0 alone logs, evaluates and writes files.
        self.dist = distributed.current()
        self.rank, self.world_size = (self.dist.rank, self.dist.world_size) if self.dist else (0, 1)
        if self.dist is not None:
            distributed.check_supported(cfg.agent.name, online=cfg.data is None)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)  # one GPU per process
            if not self.dist.is_main:
                cfg.log.progress = False
        rank_seed = cfg.seed + self.rank * distributed.RANK_SEED_STRIDE
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed image and batch shapes: let cuDNN pick its fastest convs
        torch.set_num_threads(_resolve_threads(cfg.get("threads", "auto")))
        self.offline = cfg.data is not None
        seed_everything(rank_seed)
        self.agent_overrides = dict(agent_overrides or {})
        e = cfg.env
        obs = tuple(e.obs)
        # MuJoCo Warp steps and renders on the learner's device; dm_control always on the CPU.
        env_device = str(self.device) if e.backend == "mjwarp" else "cpu"
        self.env = make_env(e.task, obs=obs, image_size=e.image_size, camera=e.camera,
                            action_repeat=e.action_repeat, num_envs=1 if self.offline else e.num_envs,
                            backend=e.backend, device=env_device, seed=rank_seed, floor=e.floor,
                            episode_length=e.episode_length, num_workers=0 if self.offline else e.num_workers)
        self.eval_env = None
        try:
            eval_obs = tuple(dict.fromkeys((*obs, "pixels"))) if cfg.eval.video else obs
            if self.rank == 0:  # rank 0 alone evaluates
                self.eval_env = make_env(e.task, obs=eval_obs, image_size=e.image_size, camera=e.camera,
                                         action_repeat=e.action_repeat, num_envs=int(cfg.eval.get("num_envs", 1)),
                                         backend=e.backend, device=env_device,
                                         seed=cfg.seed + 10_000, floor=e.floor, episode_length=e.episode_length,
                                         num_workers=0)
            with adam_implementation(self.learner["adam"]):  # every agent builds its Adams with make_adam
                self.agent: Agent = make_agent(cfg.agent.name, self.env, preset=cfg.agent.preset,
                                               device=str(self.device), **self.agent_overrides)
            self._stage: list = []  # online steps kept on the env's device until one write (collector.inline_steps)
            self.inline_steps, storage = self._online_placement()
            self.buffer_storage_device = storage
            self.buffer = self.make_buffer()
            if self.offline:
                self._check_dataset_fits()
            self.spec = self.agent.sample_spec()
            _check_sample_spec(self.spec)
            if self.dist is not None:  # each rank samples its share of the global batch, offline from its episodes
                self.spec = distributed.shard_spec(self.spec, self.world_size)
                if self.offline:
                    self.buffer.shard_episodes(self.rank, self.world_size)
                else:  # online, each rank's buffer numbers its episodes rank, rank + W, ...: ids unique in the job
                    self.buffer.number_episodes(self.rank, self.world_size)
            self.env_steps = 0
            self.updates = 0
            self.episodes = 0
            self.checkpoint_path = self.run_dir / "checkpoints" / "latest.pt"
            self.model_path = self.run_dir / "model"
            self._params_checked_at = 0  # the update at which every parameter was last seen finite
            self._apply_learner_options()
            if cfg.resume:  # before the logger: a checkpoint that cannot be resumed leaves the run folder untouched
                self._resume(finished_ok)
            if self.dist is not None:  # identical replicas, kept identical by averaged gradients
                distributed.broadcast_module(self.agent)
                self._averager = distributed.GradientAverager(self.agent.optimizers())
            self.logger = _NullLogger() if self.rank else RunLogger(
                self.run_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                config=OmegaConf.to_container(cfg, resolve=True))
            if cfg.resume:  # rows logged after the checkpoint would be logged again: metrics.csv keeps one history
                dropped = self.logger.drop_rows_after(self.current)
                if dropped:
                    print(f"[latentrl] metrics.csv: dropped {dropped} rows logged after the checkpoint's step "
                          f"{self.current}")
        except BaseException:  # a run that cannot start leaves no env worker processes behind
            for env in (self.eval_env, self.env):
                if env is not None and not getattr(env, "is_closed", False):
                    env.close()
            raise

    def make_buffer(self) -> ReplayBuffer:
        """The run's replay buffer: the dataset (offline) or an empty buffer of ``buffer_capacity`` rows.

        Built before a resume restores its contents, so a subclass that overrides this gets its own
        buffer type back from the checkpoint.
        """
        if self.offline:
            return ReplayBuffer.load(self.cfg.data, device=self.device)
        _check_buffer_fits(self.cfg.buffer_capacity, self.env, self.buffer_storage_device)
        # the buffer records its domain: a dataset saved from it is never relabelled with another domain's rewards
        return ReplayBuffer(self.cfg.buffer_capacity, device=self.device, domain=self.env.task.domain,
                            storage_device=self.buffer_storage_device)

    def _online_placement(self) -> tuple[int, torch.device | None]:
        """``collector.inline_steps`` and the online buffer's storage device (``buffer_device``), resolved.

        ``auto``: with MuJoCo Warp envs on a GPU, the frames stay on the GPU (buffer storage there) and 16 steps
        of every env are written at once, with no host read per step (:meth:`_online_steps`); otherwise the
        CPU loop as before (storage on the host, each step written as it comes)."""
        cfg = self.cfg
        gpu_envs = cfg.env.backend == "mjwarp" and self.device.type == "cuda"
        steps = OmegaConf.select(cfg, "collector.inline_steps", default="auto")
        steps = (16 if gpu_envs else 1) if steps == "auto" else int(steps)
        where = OmegaConf.select(cfg, "buffer_device", default="auto")
        if self.offline:
            return steps, None
        if where == "auto":
            return steps, self.device if gpu_envs else None
        where = resolve_device(where)
        return steps, None if where.type == "cpu" else where

    def _check_dataset_fits(self) -> None:
        """An offline dataset must be of the run's domain and hold the observations the env is built with,
        in their shapes (else a shape error deep inside the first update, or a key error at the first sample)."""
        data, task = self.cfg.data, self.cfg.env.task
        domain = self.env.task.domain
        held = getattr(self.buffer, "domain", None)
        if held is not None and held != domain:
            raise ValueError(f"data={data} holds {held} steps, but env={task} is a {domain} task; train with the "
                             f"dataset's domain (env=<a {held} task>) or give a {domain} dataset")
        storage = self.buffer.storage
        if storage is None or len(self.buffer) == 0:
            raise ValueError(f"data={data} holds no transitions; give a dataset collect_dataset.py wrote")
        stored = [k for k in ("pixels", "state", "physics") if k in storage.keys()]
        for key, spec in self.env.observation_spec.items():
            if key not in ("pixels", "state", "physics"):
                continue
            if key not in storage.keys():
                raise ValueError(f"data={data} stores {', '.join(stored)} but the run reads {key} (env.obs="
                                 f"[{','.join(self.cfg.env.obs)}]); train on what the dataset holds (env.obs=[...] "
                                 f"and agent.obs_type from {', '.join(stored)}) or give a dataset with {key}")
            want, have = list(spec.shape[1:]), list(storage[key].shape[1:])
            if want != have:
                raise ValueError(f"data={data} stores {key} of shape {have}, but env={task} gives {key} of shape "
                                 f"{want}: the dataset is of another domain or image size; set env= and "
                                 "env.image_size to the dataset's")

    # --------------------------------------------------------------------------------- checkpoints
    def _config_dict(self) -> dict:
        out = OmegaConf.to_container(self.cfg, resolve=True)
        out["agent"]["overrides"] = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                                     for k, v in self.agent_overrides.items()}  # list overrides as plain lists
        out["world_size"] = self.world_size  # data-parallel processes (resume checks it)
        return out

    def check_parameters(self) -> None:
        """Stop with an error when a parameter is NaN or infinite although the losses looked finite (an update
        can break parameters without a non-finite loss showing); run at each log row and before every save, so
        a broken agent is never written over a good checkpoint. One host sync per check."""
        if self.updates == self._params_checked_at:
            return  # no update since the last check
        bad = first_non_finite_parameter(self.agent)
        if bad is not None:
            raise NonFiniteLossError(
                f"non-finite parameter after update {self.updates} (env step {self.env_steps}): {bad}; every "
                f"parameter was finite at update {self._params_checked_at}, so an update after that one broke it. "
                "Training stopped; the last checkpoint holds the state before. Lower the learning rate, check the "
                "inputs, or resume from the checkpoint with another seed."
            )
        self._params_checked_at = self.updates

    def save(self) -> Path:
        """The checkpoint (``checkpoints/latest.pt``, to resume) and the model directory (``model/``, to use).

        Data-parallel: every rank calls it. The ranks are first checked identical; ranks >= 1 write their own
        resume state (RNG streams, online replay buffer: ``checkpoints/rank<r>-<step>.pt``), then all wait at a
        barrier while rank 0 alone writes the checkpoint and the model directory, and again after it, so a job
        stopped during a save never leaves a checkpoint naming rank states that are not on disk."""
        self.check_parameters()
        self._flush_stage()  # steps collected but not yet written belong in the checkpoint's buffer
        if self.dist is None:
            return self._write_checkpoint()
        distributed.check_consistent(self.agent)
        if self.rank:
            self._save_rank_state()
        distributed.barrier()
        path = self.checkpoint_path if self.rank else self._write_checkpoint()
        distributed.barrier()
        if self.rank and not self.cfg.keep_checkpoints:  # the checkpoint now names this step: older states go
            for old in self.checkpoint_path.parent.glob(f"rank{self.rank}-*.pt"):
                if old != distributed.rank_state_path(self.checkpoint_path, self.rank, self.current):
                    old.unlink(missing_ok=True)
        return path

    def _save_rank_state(self) -> None:
        """Rank >= 1's own resume state, written atomically (a temporary file moved into place)."""
        path = distributed.rank_state_path(self.checkpoint_path, self.rank, self.current)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": self.current, "world_size": self.world_size, "rank": self.rank, "rng": capture_rng(),
                 "buffer": None if self.offline else self.buffer.state_dict()}
        save_atomic(state, path)

    def _write_checkpoint(self) -> Path:
        """Write the checkpoint and the model directory (rank 0's part of :meth:`save`)."""
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

    def _resume(self, finished_ok: bool = False) -> None:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"resume=true but {self.checkpoint_path} does not exist: there is no run to "
                                    f"continue in {self.run_dir}; drop resume=true to start a new run")
        payload = load_checkpoint(self.checkpoint_path)  # also restores the RNG states
        self._check_resume_config(payload.get("config") or {})
        restore_agent(payload, self.agent, self.checkpoint_path)
        counters = payload["counters"]
        self.env_steps, self.updates, self.episodes = counters["env_steps"], counters["updates"], counters["episodes"]
        if payload.get("buffer") is not None and not self.offline:
            self.buffer.load_state_dict(payload["buffer"])
            self.buffer.end_episodes()
        self._resume_rank_state(int((payload.get("config") or {}).get("world_size", 1)))
        # Episodes in flight when the run stopped are lost; the env starts fresh ones with new ids.
        self.env.set_seed(self._env_seed(resumed=True))
        print(f"[latentrl] resumed from {self.checkpoint_path} at env step {self.env_steps}, update {self.updates}")
        self._params_checked_at = self.updates
        if self.current >= self.cfg.steps and not finished_ok:
            unit = "updates" if self.offline else "env steps"
            raise ValueError(f"resume=true: the run in {self.run_dir} is already at {self.current} {unit} and "
                             f"steps={self.cfg.steps}, so nothing is left to train; to train longer, raise steps "
                             f"(e.g. steps={2 * self.current})")

    def _resume_rank_state(self, saved_world: int) -> None:
        """Data-parallel resume: with the checkpoint's world size, rank r >= 1 takes back its RNG streams (and its
        online replay buffer) from ``checkpoints/rank<r>-<step>.pt``; rank 0's are in the checkpoint itself.
        Offline, another world size re-shards the dataset (episode ids modulo the new size; the global batch is
        unchanged) and ranks >= 1 draw fresh RNG streams. Online, another world size is refused: each rank's
        envs and replay buffer belong to that rank."""
        world = self.world_size
        if saved_world != world:
            if not self.offline:
                how = (f"torchrun --nproc_per_node {saved_world} scripts/train_agent.py ... resume=true"
                       if saved_world > 1 else "scripts/train_agent.py ... resume=true without torchrun")
                raise ValueError(f"cannot resume {self.checkpoint_path} with {world} process(es): the online run was "
                                 f"trained by {saved_world}, each with its own envs and replay buffer (saved per "
                                 f"rank), which cannot be split or merged. Resume it with {saved_world}: {how}")
            if self.rank == 0:
                print(f"[latentrl] resuming an offline run of {saved_world} process(es) with {world}: the dataset is "
                      f"re-sharded by episode, the global batch stays agent.batch_size")
            if self.rank:
                seed_everything(self.cfg.seed + self.rank * distributed.RANK_SEED_STRIDE + self.updates)
            return
        if self.rank == 0:
            return
        path = distributed.rank_state_path(self.checkpoint_path, self.rank, self.current)
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume rank {self.rank}: {path} (its RNG streams and replay buffer at "
                                    f"step {self.current}) is missing. With several nodes, run_dir must be on storage "
                                    "every node sees")
        state = load_plain(path, map_location=None)  # where it was saved, as before
        restore_rng(state["rng"])
        if state.get("buffer") is not None and not self.offline:
            self.buffer.load_state_dict(state["buffer"])
            self.buffer.end_episodes()

    def _env_seed(self, resumed: bool) -> int:
        """This rank's env seed; a resumed run continues with fresh env streams (from its env step), never the
        ones the stopped run started with."""
        fresh = 1_000_003 * (self.env_steps + 1) if resumed else 0
        return self.cfg.seed + fresh + self.rank * distributed.RANK_SEED_STRIDE

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
    def _apply_learner_options(self) -> None:
        """``learner.channels_last`` and ``learner.compile`` on the agent's networks (``learner.adam`` was applied
        when the agent was built, ``learner.amp`` wraps each update); the metrics of updates wait in
        :class:`PendingMetrics` until a log row, an evaluation or a save reads them."""
        self._pending = PendingMetrics(self.device)
        self.last_metrics: dict[str, float] = {}
        if self.learner["channels_last"] != "auto":
            set_channels_last(self.agent, self.learner["channels_last"])
        mode = self.learner["compile"]
        if mode:
            compile_networks(self.agent, mode=None if mode is True else mode)
        # CUDA graphs (compile's reduce-overhead / max-autotune on CUDA) are told where each update starts, so a
        # replay never overwrites outputs an update still reads
        self._cudagraphs = self.device.type == "cuda" and mode in (True, "reduce-overhead", "max-autotune")

    def _read_metrics(self) -> dict[str, float]:
        """The last update's metrics as floats, after checking every update since the last read (one host sync);
        the previous ones when no update came since."""
        self.last_metrics.update(self._pending.read(self.agent))
        return dict(self.last_metrics)

    def _update(self) -> dict[str, Tensor]:
        """One update; its metrics stay on the device (read later by :meth:`_read_metrics`)."""
        batch = sample_batches(self.buffer, self.spec)
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.learner["amp"] == "bf16"):
                metrics = self.agent.update(batch)
        except RuntimeError as err:  # e.g. an eigen-solver failing on NaN inputs
            inputs = _non_finite_inputs(batch)
            if not inputs:
                raise
            raise NonFiniteLossError(
                f"non-finite observations at update {self.updates + 1} (env step {self.env_steps}): the sampled "
                f"batch held non-finite values in {', '.join(inputs)} and the update failed "
                f"({str(err).splitlines()[0][:160]}). The data is damaged: check the dataset or the env. Training "
                "stopped; the last checkpoint holds the state before this update."
            ) from err
        self.updates += 1
        self._pending.append(self.updates, self.env_steps, metrics, batch)
        if len(self._pending) >= PendingMetrics.MAX_PENDING:
            self._read_metrics()  # bounded memory between log rows; one sync per MAX_PENDING updates
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        if self.rank:  # rank 0 alone evaluates; the others wait at their next collective
            return {}
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
        started, start_count = time.time(), self.current
        self.stopped_by: str | None = None  # the signal that stopped this run early, if one did
        try:
            if self.offline:
                loop = self._offline_steps()
            else:
                loop = self._online_steps()
            with GracefulStop() as stop:
                for _ in loop:  # updates leave their metrics on the device; they are read below, not per update
                    progress.update(self.current - progress.n)
                    if self.current >= next_log:
                        metrics = self._read_metrics()  # raises at the first non-finite update since the last read
                        self.check_parameters()
                        rate = (self.current - start_count) / max(time.time() - started, 1e-9)
                        self.logger.log(self.current, {**metrics, "updates": self.updates, "env_steps": self.env_steps,
                                                         f"{unit.replace(' ', '_')}_per_s": rate})
                        progress.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:3]})
                        next_log = _next_multiple(self.current, cfg.log.every)
                    if self.current >= next_eval and cfg.eval.every > 0:
                        self._read_metrics()  # a non-finite update stops the run before it is evaluated
                        last_eval, last_eval_at = self.evaluate(self.current), self.current
                        self.logger.log(self.current, last_eval)
                        next_eval = _next_multiple(self.current, cfg.eval.every)
                    if self.current >= next_ckpt:
                        self._read_metrics()  # ... and before it is saved over the last good checkpoint
                        self.save()
                        next_ckpt = _next_multiple(self.current, cfg.checkpoint_every)
                    if self.current >= total or stop.requested:
                        break
            self.stopped_by = stop.requested
            progress.n = self.current
            progress.close()
            at_end = (cfg.eval.every > 0 or cfg.eval.at_end) and last_eval_at != self.current  # not twice at one step
            self._read_metrics()
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
        if OmegaConf.select(cfg, "collector.kind", default="inline") != "inline":
            yield from self._collector_steps()
            return
        env, agent = self.env, self.agent
        policy = agent.policy(explore=True)
        # inline_steps > 1: nothing is read on the host per step. The policy restarts rows without reading
        # is_first, the env decides resets from its own step count (MuJoCo Warp's sync_free), and the steps stay
        # on the env's device until inline_steps of them go to the buffer in one write (_flush_stage), which
        # makes the loop's one host read (done flags, episode ids; the env's deferred action / physics checks).
        # The updates in between sample from the buffer without those steps (as with a TorchRL collector).
        # (dm_control envs step on the host anyway: there it only batches the writes.)
        sync_free = self.inline_steps > 1
        policy.sync_free = sync_free
        if sync_free and hasattr(env, "check_deferred"):
            env.sync_free = True
        td = env.reset()
        n = env.batch_size[0]
        carry = policy.init_carry(n)
        is_first = torch.ones(n, dtype=torch.bool, device=td.device)
        update_debt = 0.0
        while True:
            obs = td.exclude("action", "next")
            action, carry = policy.step(obs, carry, is_first)
            td["action"] = action
            for key, value in policy.extras(carry).items():
                td[key] = value.to(action.device)
            td, td_next = env.step_and_maybe_reset(td)
            is_first = td["next", "done"].reshape(-1)  # stays on the env's device
            self._stage.append(td)
            if len(self._stage) >= self.inline_steps:
                self._flush_stage()
            metrics, update_debt = self._count_and_update(n, update_debt)
            td = td_next
            yield metrics

    def _flush_stage(self) -> None:
        """Write the online steps kept on the env's device to the buffer (``[num_envs, T]`` at once)."""
        if not self._stage:
            return
        stage, self._stage = self._stage, []
        if getattr(self.env, "sync_free", False):
            self.env.check_deferred()  # non-finite actions or diverged worlds: raised before they are stored
        self._store(stage[0] if len(stage) == 1 else torch.stack(stage, dim=1))

    def _store(self, steps) -> None:
        """Collected env steps (``[num_envs]`` or ``[num_envs, T]``) into the buffer; count the episodes they end."""
        self.buffer.extend(steps)
        self.episodes += int(steps["next", "done"].sum())

    def _count_and_update(self, frames: int, debt: float) -> tuple[dict, float]:
        """Count ``frames`` env steps this rank collected (the counters are the job's: every rank steps alike)
        and make the updates they pay for (``updates_per_step``, once ``learning_starts`` is reached). Returns
        the last update's metrics (``{}`` when none was made) and the fraction of an update carried over."""
        self.env_steps += frames * self.world_size
        self.agent.env_steps = self.env_steps
        metrics: dict = {}
        if self.env_steps >= self.cfg.learning_starts and len(self.buffer) > 0:
            debt += frames * self.world_size * self.cfg.updates_per_step
            while debt >= 1:
                metrics = self._update()
                debt -= 1
        return metrics, debt

    def _collector_steps(self):
        """Online steps through a TorchRL collector (``collector.kind``; :mod:`latentrl.training.collectors`):
        each collected batch ``[workers * num_envs, T]`` goes to the buffer whole, the updates it pays for
        follow, and the new weights go to the collector's workers before it collects the next batch."""
        from latentrl.training.collectors import make_collector, replay_steps

        cfg, e, agent = self.cfg, self.cfg.env, self.agent
        if e.backend != "dmc":
            raise ValueError(f"collector.kind={cfg.collector.kind} runs dm_control envs in collector processes; "
                             f"env.backend={e.backend} steps its batch on the learner's device: use "
                             "collector.kind=inline with it")
        env_kwargs = dict(task=e.task, obs=tuple(e.obs), image_size=e.image_size, camera=e.camera,
                          action_repeat=e.action_repeat, num_envs=e.num_envs, backend="dmc", device="cpu",
                          floor=e.floor, episode_length=e.episode_length,
                          num_workers=0 if e.num_workers is None else e.num_workers)
        policy = agent.policy(explore=True)
        collector = make_collector(cfg.collector.kind, env_kwargs, policy, tuple(e.obs),
                                   workers=int(cfg.collector.workers),
                                   steps_per_batch=int(cfg.collector.steps_per_batch),
                                   seed=self._env_seed(resumed=self.env_steps > 0))
        update_debt = 0.0
        try:
            for batch in collector:
                steps = replay_steps(batch)
                self._store(steps)
                metrics, update_debt = self._count_and_update(steps.numel(), update_debt)
                if metrics:  # new weights: to the collector's workers before the next batch
                    collector.update_policy_weights_()
                yield metrics
        finally:
            collector.shutdown()


class _NullLogger:
    """What ranks other than 0 log to under data parallelism: nothing."""

    def log(self, step: int, metrics: dict) -> None:
        del step, metrics

    def drop_rows_after(self, step: int) -> int:
        del step
        return 0

    def close(self) -> None:
        pass


def _check_buffer_fits(capacity: int, env, storage_device: torch.device | None = None) -> None:
    """Refuse a replay capacity whose storage would not fit in memory, or in the GPU's memory for a buffer
    stored there (``buffer_device``); it is allocated on first write."""
    row = sum(int(np.prod(spec.shape[1:])) * spec.dtype.itemsize for spec in env.observation_spec.values())
    row += int(np.prod(env.action_spec.shape[1:])) * 4 + 16
    need = capacity * row
    where = "memory"
    try:
        if storage_device is not None and storage_device.type == "cuda":
            available, where = torch.cuda.mem_get_info(storage_device)[0], f"{storage_device} memory"
        else:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError):
        return
    if need > 0.8 * available:
        raise MemoryError(
            f"buffer_capacity={capacity} needs about {need / 2**30:.1f} GiB ({row} bytes per step) but only "
            f"{available / 2**30:.1f} GiB of {where} is free; lower buffer_capacity (e.g. "
            f"buffer_capacity={int(0.5 * available / row)})"
        )


def _check_sample_spec(spec) -> None:
    """The agent's sample requests ask for at least one row (``agent.batch_size=0`` is refused here, not at the
    first update)."""
    specs = spec.values() if isinstance(spec, dict) else [spec]
    for one in specs:
        for field in ("batch_size", "frame_stack", "horizon"):
            value = getattr(one, field, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"the agent's settings ask for update batches with {field}={value!r}; it must be an "
                                 f"integer >= 1: set agent.{field}=<n> (n >= 1)")


def _resolve_threads(threads) -> int:
    if threads == "auto":
        return max(1, (os.cpu_count() or 2) // 2)
    return int(threads)


def _next_multiple(x: int, every: int) -> int:
    if every <= 0:
        return 1 << 62
    return (x // every + 1) * every
