"""SimRobot: a dm_control / MuJoCo task running in real time in its own process, behind the Robot protocol.

The child process (started with ``spawn``: an EGL display does not survive ``fork``) owns the
dm_control env and one offscreen renderer set up as ``envs/dmc.py`` does. Each tick it reads the
action mailbox, holds the newest due control, advances the physics to the tick's simulated time at
the physics' own timestep, renders one frame, writes one observation into a ring in shared memory
and sleeps to the next tick on a wall / sim clock pair (MuJoCo viewer's ``_physics_loop``): a drift
above :data:`MAX_SYNC_MISALIGN` re-syncs (counted), it never catches up in a burst.

Like hardware, observations arrive late (``LatencyModel``: release at ``max(previous release,
capture + delay)``, so order is kept), some never arrive (``obs_drop_prob``: ``seq`` stalls), some
actions are lost (``action_drop_prob``: the previous control is kept), and a watchdog zeroes the
control and latches a fault when no new action came for ``action_timeout_s`` (FCI's communication
constraint, ros2_controllers' command time-out).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory

import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor

from latentrl.control.robot import (
    DeviceAlreadyConnectedError,
    DeviceNotConnectedError,
    Feature,
    RobotFaultError,
    check_action,
)

__all__ = ["MAX_SYNC_MISALIGN", "LatencyModel", "SimRobot"]

MAX_SYNC_MISALIGN = 0.1
"""Seconds the simulation may fall behind the wall clock before it re-syncs instead of catching up."""


@dataclass(frozen=True)
class LatencyModel:
    """Delays (ms) and losses of observations and actions between the robot and the loop (seeded).

    A sample captured at ``t`` is released at ``max(previous release, t + delay)``, ``delay = ms +
    jitter`` with the jitter uniform in ``[0, jitter_ms]`` or lognormal with median ``jitter_ms / 2``.
    """

    obs_ms: float = 0.0
    obs_jitter_ms: float = 0.0
    action_ms: float = 0.0
    action_jitter_ms: float = 0.0
    jitter: str = "uniform"
    obs_drop_prob: float = 0.0
    action_drop_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.jitter not in ("uniform", "lognormal"):
            raise ValueError(f"LatencyModel.jitter must be 'uniform' or 'lognormal', got {self.jitter!r}")
        for name in ("obs_ms", "obs_jitter_ms", "action_ms", "action_jitter_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LatencyModel.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("obs_drop_prob", "action_drop_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"LatencyModel.{name} must be in [0, 1), got {getattr(self, name)}")

    def delay_s(self, rng: np.random.Generator, kind: str) -> float:
        base, jitter = (self.obs_ms, self.obs_jitter_ms) if kind == "obs" else (self.action_ms, self.action_jitter_ms)
        if jitter <= 0:
            return base / 1e3
        if self.jitter == "uniform":
            extra = rng.uniform(0.0, jitter)
        else:
            extra = min(float(rng.lognormal(math.log(jitter / 2), 0.5)), 10 * jitter)
        return (base + extra) / 1e3


def _array_specs(ring: int, image_size: int, state_dim: int, physics_dim: int, action_dim: int, pixels: bool):
    specs = {
        "state": ((ring, state_dim), np.float32), "physics": ((ring, physics_dim), np.float64),
        "reward": ((ring,), np.float32), "timestamp": ((ring,), np.float64), "release_t": ((ring,), np.float64),
        "seq": ((ring,), np.int64), "version": ((ring,), np.int64),
        "action": ((action_dim,), np.float32), "action_seq": ((1,), np.int64), "action_sent_t": ((1,), np.float64),
        "action_version": ((1,), np.int64), "ctrl": ((action_dim,), np.float32), "fault": ((1,), np.int64),
        "resyncs": ((1,), np.int64), "ticks": ((1,), np.int64), "sim_time": ((1,), np.float64),
        "wall_time": ((1,), np.float64), "actions_dropped": ((1,), np.int64), "obs_dropped": ((1,), np.int64),
        "episode": ((1,), np.int64),
    }
    if pixels:
        specs["pixels"] = ((ring, 3, image_size, image_size), np.uint8)
    return specs


def _probe(task_name: str) -> dict:
    """Sizes of a task's state, physics and action (a throwaway env in this process, no rendering)."""
    from latentrl.envs.tasks import get_physics_state, get_task

    env = get_task(task_name).make_dm_env(seed=0, time_limit=float("inf"))
    step = env.reset()
    names = []
    for key, value in step.observation.items():
        n = int(np.asarray(value).size)
        names += [key] if n == 1 else [f"{key}.{i}" for i in range(n)]
    physics = env.physics
    return {"state_dim": len(names), "state_names": tuple(names), "physics_dim": int(get_physics_state(physics).size),
            "action_dim": int(physics.model.nu), "control_timestep": float(env.control_timestep()),
            "physics_timestep": float(physics.timestep()),
            "joint_names": tuple(physics.model.id2name(i, "actuator") or f"a{i}" for i in range(physics.model.nu))}


def _sim_main(conn, cfg: dict, shm_names: dict, specs: dict) -> None:
    """The child process: physics, rendering and pacing (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides on Ctrl-C and closes us
    shms = {k: shared_memory.SharedMemory(name=name) for k, name in shm_names.items()}
    a = {k: np.ndarray(shape, dtype=dtype, buffer=shms[k].buf) for k, (shape, dtype) in specs.items()}
    renderer = None
    try:
        import mujoco

        from latentrl.envs import dmc
        from latentrl.envs.tasks import get_physics_state, get_task

        task = get_task(cfg["task"])
        env = task.make_dm_env(seed=cfg["seed"], time_limit=float("inf"))
        physics = env.physics
        latency = LatencyModel(**cfg["latency"])
        rng = np.random.default_rng(cfg["seed"])
        period = 1.0 / cfg["rate_hz"]
        ring = a["seq"].shape[0]
        camera = task.default_camera if cfg["camera"] is None else cfg["camera"]
        if "pixels" in a:
            model = physics.model.ptr
            model.vis.global_.offwidth = model.vis.global_.offheight = cfg["image_size"]
            model.vis.quality.offsamples = 0
            dmc._use_configured_gl_backend()
            renderer = dmc._make_renderer(model, cfg["image_size"])
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            frame = np.empty((cfg["image_size"], cfg["image_size"], 3), dtype=np.uint8)
        seq = 0
        last_release = 0.0

        def write_obs(observation, reward: float) -> None:
            nonlocal seq, last_release
            slot = seq % ring
            a["version"][slot] += 1  # odd: being written
            if renderer is not None:
                renderer.update_scene(physics.data.ptr, camera=camera)
                renderer.render(out=frame)
                a["pixels"][slot] = frame.transpose(2, 0, 1)
            capture_t = time.monotonic()
            a["state"][slot] = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1)
                                               for v in observation.values()])
            a["physics"][slot] = get_physics_state(physics)
            a["reward"][slot] = reward
            a["timestamp"][slot] = capture_t
            a["seq"][slot] = seq
            if latency.obs_drop_prob > 0 and rng.random() < latency.obs_drop_prob:
                a["release_t"][slot] = math.inf
                a["obs_dropped"][0] += 1
            else:
                last_release = max(last_release, capture_t + latency.delay_s(rng, "obs"))
                a["release_t"][slot] = last_release
            a["version"][slot] += 1
            seq += 1

        def reset_episode() -> None:
            step = env.reset()
            a["episode"][0] += 1
            write_obs(step.observation, 0.0)

        step = env.reset()
        write_obs(step.observation, 0.0)
        conn.send(("ok", None))

        ctrl = np.zeros(a["ctrl"].shape, dtype=np.float64)
        pending: deque = deque()
        last_apply = 0.0
        last_action_seq, last_action_rx = 0, None
        wall0 = time.monotonic()
        sim0 = physics.data.time
        tick = 0
        while True:
            if conn.poll():
                cmd = conn.recv()
                if cmd == "close":
                    break
                if cmd == "reset":  # a new episode: zero control, the watchdog re-arms with the next action
                    reset_episode()
                    sim0, wall0, tick = physics.data.time, time.monotonic(), 0
                    ctrl, last_action_rx = np.zeros_like(ctrl), None
                    pending.clear()
                elif cmd == "clear_fault":
                    a["fault"][0] = 0
                    last_action_rx = None
                conn.send(("ok", None))
            now = time.monotonic()
            # the action mailbox, under its seqlock
            v1 = int(a["action_version"][0])
            action, action_seq, sent_t = a["action"].copy(), int(a["action_seq"][0]), float(a["action_sent_t"][0])
            if v1 % 2 == 0 and v1 == int(a["action_version"][0]) and action_seq > last_action_seq:
                last_action_seq, last_action_rx = action_seq, now
                if latency.action_drop_prob > 0 and rng.random() < latency.action_drop_prob:
                    a["actions_dropped"][0] += 1
                else:
                    last_apply = max(last_apply, sent_t + latency.delay_s(rng, "action"))
                    pending.append((last_apply, action))
            while pending and pending[0][0] <= now:
                ctrl = pending.popleft()[1].astype(np.float64)
            if last_action_rx is not None and now - last_action_rx > cfg["action_timeout_s"]:
                a["fault"][0] = 1  # watchdog: latched until clear_fault (reconnect)
            if a["fault"][0]:
                ctrl = np.zeros_like(ctrl)
                pending.clear()
            a["ctrl"][:] = ctrl
            tick += 1
            target = sim0 + tick * period
            env.task.before_step(ctrl, physics)
            while physics.data.time < target - 1e-9:
                physics.step()
            env.task.after_step(physics)
            write_obs(env.task.get_observation(physics), float(env.task.get_reward(physics) or 0.0))
            a["ticks"][0] = tick
            a["sim_time"][0] = physics.data.time - sim0
            a["wall_time"][0] = time.monotonic() - wall0
            if not cfg["realtime"]:
                continue
            wall_due = wall0 + tick * period
            lag = time.monotonic() - wall_due
            if lag > MAX_SYNC_MISALIGN:  # fell behind: re-sync, never catch up in a burst
                a["resyncs"][0] += 1
                wall0 += lag
                wall_due += lag
            delay = wall_due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        try:
            conn.send(("error", f"SimRobot process: {type(err).__name__}: {err}\n{traceback.format_exc()}"))
        except (BrokenPipeError, OSError):
            pass
    finally:
        if renderer is not None:
            renderer.close()
        for shm in shms.values():
            shm.close()


class SimRobot:
    """A dm_control task as a robot, running in real time in a child process.

    Args:
        task: a latentrl task name (``"reacher-easy"``: a 2-joint arm reaching a target).
        image_size: side of the ``pixels`` frames; ``0`` renders none (state-only robots).
        camera: camera id (the task's default when ``None``).
        rate_hz: ticks per second (one physics advance, one frame); default the task's control rate
            ``1 / control_timestep`` (reacher: 50 Hz).
        latency: observation / action delays and losses (:class:`LatencyModel`).
        action_timeout_s: the watchdog (default 3 periods): no new action for that long zeroes the
            control and latches a fault (:class:`RobotFaultError` on the next call, until reconnect).
        seed: seeds the task's initial states and the latency draws.
        realtime: ``False`` runs the physics as fast as it goes (no sleeping; for tests of the data path).
        connect_timeout_s: how long ``connect`` waits for the child's first observation.
    """

    preferred_fallback = "zero"  # dm_control actuators are torques / velocities: zero is the safe command

    def __init__(self, task: str = "reacher-easy", *, image_size: int = 64, camera: int | None = None,
                 rate_hz: float | None = None, latency: LatencyModel | None = None,
                 action_timeout_s: float | None = None, seed: int = 0, realtime: bool = True,
                 connect_timeout_s: float = 120.0, ring: int | None = None):
        info = _probe(task)
        self.task, self.name = task, f"sim:{task}"
        self.image_size, self.camera, self.seed, self.realtime = int(image_size), camera, int(seed), bool(realtime)
        self.rate_hz = float(rate_hz) if rate_hz else 1.0 / info["control_timestep"]
        self.latency = latency or LatencyModel()
        self.action_timeout_s = float(action_timeout_s) if action_timeout_s else 3.0 / self.rate_hz
        self.connect_timeout_s = float(connect_timeout_s)
        worst = (self.latency.obs_ms + 10 * max(self.latency.obs_jitter_ms, 0)) / 1e3
        self.ring = int(ring or max(4, math.ceil(worst * self.rate_hz) + 3))
        self.info = info
        nu = info["action_dim"]
        self.observation_features: dict[str, Feature] = {
            "state": Feature((info["state_dim"],), torch.float32, info["state_names"],
                             description="dm_control's observation, flattened in its order"),
            "physics": Feature((info["physics_dim"],), torch.float64, description="mjSTATE_PHYSICS; recorded only"),
            "reward": Feature((), torch.float32, description="the task's reward after the last physics advance"),
            "timestamp": Feature((), torch.float64, description="time.monotonic() at capture"),
            "seq": Feature((), torch.int64, description="capture counter"),
        }
        if self.image_size > 0:
            self.observation_features = {"pixels": Feature((3, self.image_size, self.image_size), torch.uint8,
                                                           low=0, high=255), **self.observation_features}
        self.action_features = {"action": Feature((nu,), torch.float32, info["joint_names"], -1.0, 1.0)}
        self._proc = None
        self._shms: dict[str, shared_memory.SharedMemory] = {}
        self._a: dict[str, np.ndarray] = {}
        self._action_seq = 0
        self._last_seq = -1

    # ------------------------------------------------------------------------------- protocol
    @property
    def is_connected(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        """Nothing to calibrate in simulation."""

    def configure(self) -> None:
        """Nothing to configure in simulation."""

    def connect(self, calibrate: bool = True) -> None:
        """Start the simulation process and wait for its first observation (``TimeoutError`` if none comes)."""
        del calibrate
        if self._proc is not None:
            raise DeviceAlreadyConnectedError(f"{self.name} is already connected")
        specs = _array_specs(self.ring, self.image_size, self.info["state_dim"], self.info["physics_dim"],
                             self.info["action_dim"], self.image_size > 0)
        for key, (shape, dtype) in specs.items():
            size = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
            self._shms[key] = shared_memory.SharedMemory(create=True, size=size)
            self._a[key] = np.ndarray(shape, dtype=dtype, buffer=self._shms[key].buf)
            self._a[key].fill(0)
        self._a["release_t"].fill(math.inf)
        self._a["seq"].fill(-1)
        cfg = {"task": self.task, "image_size": self.image_size, "camera": self.camera, "rate_hz": self.rate_hz,
               "latency": asdict(self.latency), "action_timeout_s": self.action_timeout_s, "seed": self.seed,
               "realtime": self.realtime}
        ctx = mp.get_context("spawn")  # EGL does not survive fork
        self._conn, child = ctx.Pipe()
        env = {"MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "OMP_NUM_THREADS": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self._proc = ctx.Process(target=_sim_main, args=(child, cfg, {k: s.name for k, s in self._shms.items()},
                                                             specs), daemon=True, name=f"SimRobot-{self.task}")
            self._proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self._action_seq, self._last_seq = 0, -1
        self._expect_ok(self.connect_timeout_s, "start")
        deadline = time.monotonic() + 5.0 + 20.0 / self.rate_hz
        while True:  # the first observation is released after the observation latency
            try:
                self.get_observation()
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.disconnect()
                    raise TimeoutError(f"{self.name}: no first observation within {deadline:.1f} s") from None
                time.sleep(0.002)

    def _expect_ok(self, timeout: float, what: str) -> None:
        if not self._conn.poll(timeout):
            self._teardown()
            raise TimeoutError(f"{self.name} gave no answer to {what} within {timeout:.0f} s")
        try:
            status, detail = self._conn.recv()
        except EOFError:
            self._teardown()
            raise DeviceNotConnectedError(f"{self.name}: the simulation process died during {what}") from None
        if status != "ok":
            self._teardown()
            raise RuntimeError(detail)

    def _check_alive(self) -> None:
        if self._proc is None:
            raise DeviceNotConnectedError(f"{self.name} is not connected; call connect() first")
        if not self._proc.is_alive():
            raise DeviceNotConnectedError(f"{self.name}: the simulation process has stopped "
                                          f"(exit code {self._proc.exitcode})")

    def _check(self) -> None:
        if self._proc is None:
            raise DeviceNotConnectedError(f"{self.name} is not connected; call connect() first")
        if not self._proc.is_alive():
            raise DeviceNotConnectedError(f"{self.name}: the simulation process has stopped "
                                          f"(exit code {self._proc.exitcode})")
        if self._a["fault"][0]:
            raise RobotFaultError(f"{self.name}: watchdog: no new action for {self.action_timeout_s * 1e3:.0f} ms; "
                                  "the control is zeroed until recover() (or a reconnect)")

    def get_observation(self) -> TensorDict:
        """The newest released observation (non-blocking); the same one again while none newer arrived."""
        self._check()
        a = self._a
        for _ in range(8):
            now = time.monotonic()
            version = a["version"].copy()
            ready = (version % 2 == 0) & (a["release_t"] <= now) & (a["seq"] >= 0)
            if not ready.any():
                raise TimeoutError(f"{self.name}: no observation released yet")
            seqs = np.where(ready, a["seq"], -1)
            slot = int(np.argmax(seqs))
            out = {k: a[k][slot].copy() for k in ("state", "physics", "reward", "timestamp", "seq")}
            if "pixels" in a:
                out["pixels"] = a["pixels"][slot].copy()
            if a["version"][slot] == version[slot]:
                break
        else:
            raise TimeoutError(f"{self.name}: the observation ring kept changing under the reader")
        return TensorDict({k: torch.from_numpy(np.asarray(v)) for k, v in out.items()}, batch_size=[])

    def send_action(self, action: Tensor) -> Tensor:
        """Post ``action`` ``[A]`` in [-1, 1] to the mailbox (non-blocking); returns the action as applied
        (clipped to the limits). ``ValueError`` for a wrong shape or non-finite values (never posted)."""
        self._check()
        action = check_action(action, self.info["action_dim"]).clamp(-1.0, 1.0)
        a = self._a
        self._action_seq += 1
        a["action_version"][0] += 1
        a["action"][:] = action.numpy()
        a["action_sent_t"][0] = time.monotonic()
        a["action_seq"][0] = self._action_seq
        a["action_version"][0] += 1
        return action

    def recover(self) -> None:
        """Clear a latched watchdog fault (libfranka's ``automaticErrorRecovery``): the control stays zero
        until the next action arrives, and the watchdog re-arms with it."""
        self._check_alive()
        self._conn.send("clear_fault")
        self._expect_ok(30.0, "clear_fault")

    def reset_episode(self) -> None:
        """Start a new episode (the task's random initial state); the observation ring continues its ``seq``."""
        self._check()
        self._conn.send("reset")
        self._expect_ok(30.0, "reset")

    def disconnect(self) -> None:
        """Zero the control, stop the process and free the shared memory (safe to call twice)."""
        if self._proc is None:
            return
        try:
            if self._proc.is_alive():
                self._a["action"][:] = 0.0
                self._conn.send("close")
                self._proc.join(timeout=10)
        except (BrokenPipeError, OSError):
            pass
        self._teardown()

    def _teardown(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self._proc = None
        self._a = {}
        for shm in self._shms.values():
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        self._shms = {}

    def stats(self) -> dict:
        """The simulation's counters: ticks, simulated and wall seconds, re-syncs, drops, the applied control."""
        a = self._a
        if not a:
            return {}
        return {"ticks": int(a["ticks"][0]), "sim_time": float(a["sim_time"][0]), "wall_time": float(a["wall_time"][0]),
                "resyncs": int(a["resyncs"][0]), "obs_dropped": int(a["obs_dropped"][0]),
                "actions_dropped": int(a["actions_dropped"][0]), "ctrl": a["ctrl"].copy(), "fault": int(a["fault"][0])}

    def __enter__(self) -> SimRobot:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()

    def __del__(self):
        try:
            self.disconnect()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
