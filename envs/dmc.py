"""dm_control on the CPU with fast 64x64 pixels, several envs over worker processes.

Why our own workers rather than TorchRL's ``ParallelEnv`` over ``DMControlEnv``: every step here
renders a frame, and the per-step cost we pay is one pipe message per worker plus a copy out of
shared memory; ``ParallelEnv`` builds and exchanges a TensorDict per sub-env and step, and
``DMControlEnv`` renders through dm_control's default camera path (a 240x320 multisampled buffer
with shadows and reflections), which is what ``scripts/bench_envs.py`` measures against.

Rendering: one ``mujoco.Renderer`` per env, with an offscreen buffer of exactly the image size and
shadows, reflections and multisampling off. ``MUJOCO_GL`` defaults to ``egl`` (set in
``latentrl/__init__``); ``MUJOCO_GL=osmesa`` is the fallback where EGL is missing.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing as mp
import os
import signal
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory

import mujoco
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs import EnvBase

from latentrl.envs.backend import (
    apply_gradient_floor,
    check_action,
    check_env_args,
    check_physics_states,
    closed_env_error,
    env_seeds,
    set_env_specs,
)
from latentrl.envs.tasks import PHYSICS_STATE, Task, get_physics_state, get_task, set_physics_state

__all__ = ["DMCEnv", "EnvConfig"]

# Whether this process has created a GL context. An EGL display does not survive a fork (the
# child hangs in its first context), so workers are forked only from a process that never rendered.
_RENDERED_IN_THIS_PROCESS = False


@dataclass(frozen=True)
class EnvConfig:
    """Everything a worker needs to build its envs (picklable)."""

    task: str
    obs: tuple[str, ...] = ("pixels", "state")
    image_size: int = 64
    camera: int | None = None
    action_repeat: int = 1
    floor: str = "default"
    episode_length: int = 1000
    num_envs: int = 1


def _use_configured_gl_backend() -> None:
    """Make ``mujoco.Renderer`` use ``MUJOCO_GL`` (egl by default) even if mujoco was imported first.

    MuJoCo picks its GL backend when it is first imported; a library imported before latentrl
    (torchrl does so) freezes the default (GLFW, which fails headless). Point it at the
    backend named now.
    """
    from mujoco.rendering.classic import gl_context

    backend = os.environ.get("MUJOCO_GL", "egl").lower()
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    else:
        return
    gl_context.GLContext = GLContext


def _make_renderer(model, size: int) -> mujoco.Renderer:
    """``mujoco.Renderer`` of ``size`` x ``size``, with an error that says what to install when GL is missing."""
    try:
        return mujoco.Renderer(model, size, size)
    except Exception as err:  # noqa: BLE001 - EGLError, GLError, RuntimeError... all mean the same here
        try:
            detail = f"{type(err).__name__}: {err}"
        except Exception:  # noqa: BLE001 - PyOpenGL's EGLError can fail to print itself
            detail = f"{type(err).__name__} {getattr(err, 'err', '')}".strip()
        backend = os.environ.get("MUJOCO_GL", "egl")
        raise RuntimeError(
            f"MuJoCo could not open an offscreen OpenGL context with MUJOCO_GL={backend} ({detail[:300]}). "
            "Pixels from the dmc backend need headless OpenGL: on a CPU machine Mesa's EGL (Debian/Ubuntu: "
            "apt-get install libegl1 libgl1); in an NVIDIA container the driver's graphics libraries "
            "(NVIDIA_DRIVER_CAPABILITIES must include 'graphics'); or MUJOCO_GL=osmesa with libosmesa6. Without "
            "OpenGL, use obs=('state',) / ('physics',), or backend='mjwarp', which renders without OpenGL."
        ) from err


class _Slots:
    """A group of dm_control envs that write their outputs into shared arrays.

    The same class runs in-process (``num_workers=0``) and inside each worker process.
    """

    def __init__(self, cfg: EnvConfig, env_ids: list[int], seeds: list[int], arrays: dict[str, np.ndarray]):
        self.cfg, self.env_ids, self.arrays = cfg, env_ids, arrays
        task = get_task(cfg.task)
        self.envs = [task.make_dm_env(seed=int(s), time_limit=float("inf")) for s in seeds]
        self.camera = task.default_camera if cfg.camera is None else cfg.camera
        self.renderers = []
        for env in self.envs:
            model = env.physics.model.ptr
            if cfg.floor == "gradient":
                apply_gradient_floor(model, task.domain)
            if "pixels" in cfg.obs:
                model.vis.global_.offwidth = max(cfg.image_size, 1)
                model.vis.global_.offheight = max(cfg.image_size, 1)
                model.vis.quality.offsamples = 0
                global _RENDERED_IN_THIS_PROCESS
                _RENDERED_IN_THIS_PROCESS = True
                _use_configured_gl_backend()
                renderer = _make_renderer(model, cfg.image_size)
                renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
                renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
                self.renderers.append(renderer)
        # Free GL contexts before MuJoCo's own exit hook tears down the EGL display.
        atexit.register(_close_slots, weakref.ref(self))
        self.episode = np.full(len(self.envs), -1, dtype=np.int64)
        self.step_count = np.zeros(len(self.envs), dtype=np.int64)
        self.num_episodes = np.zeros(len(self.envs), dtype=np.int64)
        self._frame = np.empty((cfg.image_size, cfg.image_size, 3), dtype=np.uint8)

    def _write_obs(self, k: int, observation) -> None:
        i, env, a = self.env_ids[k], self.envs[k], self.arrays
        if "pixels" in a:
            renderer = self.renderers[k]
            renderer.update_scene(env.physics.data.ptr, camera=self.camera)
            renderer.render(out=self._frame)
            a["pixels"][i] = self._frame.transpose(2, 0, 1)
        if "state" in a:
            a["state"][i] = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1)
                                            for v in observation.values()])
        if "physics" in a:
            a["physics"][i] = get_physics_state(env.physics)
        a["episode"][i] = self.episode[k]
        a["step"][i] = self.step_count[k]

    def reset(self, mask: np.ndarray | None = None) -> None:
        for k, i in enumerate(self.env_ids):
            if mask is not None and not mask[i]:
                continue
            time_step = self.envs[k].reset()
            # Episode ids are unique across envs: env i's n-th episode is n * num_envs + i.
            self.episode[k] = self.num_episodes[k] * self.cfg.num_envs + i
            self.num_episodes[k] += 1
            self.step_count[k] = 0
            self._write_obs(k, time_step.observation)

    def step(self) -> None:
        a = self.arrays
        for k, i in enumerate(self.env_ids):
            env, reward, terminated = self.envs[k], 0.0, False
            for _ in range(self.cfg.action_repeat):
                time_step = env.step(a["action"][i])
                reward += time_step.reward or 0.0
                if time_step.last():  # with an infinite time limit, LAST means termination
                    terminated = True
                    break
            self.step_count[k] += 1
            a["reward"][i] = reward
            a["terminated"][i] = terminated
            a["truncated"][i] = (not terminated) and self.step_count[k] >= self.cfg.episode_length
            self._write_obs(k, time_step.observation)

    def seed(self, seeds: list[int]) -> None:
        for env, s in zip(self.envs, seeds, strict=True):
            env.task._random = np.random.RandomState(int(s))  # dm_control tasks draw from task.random

    def set_state(self, states: np.ndarray) -> None:
        """Set each env's physics state (rows indexed by global env id) and refresh observations."""
        for k, i in enumerate(self.env_ids):
            physics = self.envs[k].physics
            set_physics_state(physics, states[i])
            self._write_obs(k, self.envs[k].task.get_observation(physics))

    def close(self) -> None:
        for renderer in self.renderers:
            renderer.close()
        self.renderers = []


def _close_slots(ref) -> None:
    slots = ref()
    if slots is not None:
        slots.close()


def _worker(conn, cfg: EnvConfig, env_ids, seeds, shm_specs) -> None:
    # Ctrl-C reaches the whole process group: the parent decides (a trainer finishes its step and saves),
    # and closes its workers; a worker that died on the signal would break that last step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shms = {k: shared_memory.SharedMemory(name=name) for k, (name, _, _) in shm_specs.items()}
    arrays = {k: np.ndarray(shape, dtype=dtype, buffer=shms[k].buf) for k, (_, shape, dtype) in shm_specs.items()}
    slots = None
    try:
        slots = _Slots(cfg, env_ids, seeds, arrays)
        conn.send(("ok", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "step":
                slots.step()
            elif cmd == "reset":
                slots.reset(arg)
            elif cmd == "seed":
                slots.seed(arg)
            elif cmd == "set_state":
                slots.set_state(arg)
            elif cmd == "close":
                break
            conn.send(("ok", None))
    except KeyboardInterrupt:
        pass
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        summary = f"the worker of envs {env_ids}: {type(err).__name__}: {err}".strip()
        conn.send(("error", f"{summary}\n{traceback.format_exc()}"))
    finally:
        if slots is not None:
            slots.close()
        for shm in shms.values():
            shm.close()


class DMCEnv(EnvBase):
    """A batch of ``num_envs`` dm_control envs of one task as a TorchRL env (``batch_size=[num_envs]``).

    Keys: ``pixels`` uint8 [N, 3, H, W] (newest frame), ``state`` float32 [N, D] (dm_control's
    observation dict flattened in its own key order; see :attr:`state_layout`), ``physics``
    float64 [N, P] (``mj_getState`` with ``mjSTATE_PHYSICS``), ``episode`` and ``step`` int64 [N],
    ``action`` float32 [N, A] in [-1, 1], ``("next", "reward")`` float32 [N, 1] (summed over the
    action repeat), ``terminated``/``truncated``/``done`` bool [N, 1].

    Episodes last ``episode_length`` agent steps (default: the task's own limit divided by the action
    repeat) and end as ``truncated``; a dm_control termination ends them as ``terminated``.
    Resetting with a ``"_reset"`` mask resets only those envs.
    """

    def __init__(self, task: str, *, obs=("pixels", "state"), image_size: int = 64, camera: int | None = None,
                 action_repeat: int = 1, num_envs: int = 1, num_workers: int | None = None, seed: int = 0,
                 floor: str = "default", episode_length: int | None = None, device: str | torch.device = "cpu"):
        obs = check_env_args(obs, floor, action_repeat, num_envs, image_size, episode_length, seed)
        self.task: Task = get_task(task)
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.num_envs = num_envs

        probe = self.task.make_dm_env(seed=0)
        time_step = probe.reset()
        action_dim = self.action_dim = probe.action_spec().shape[0]
        num_cameras = probe.physics.model.ncam
        if camera is not None and not -1 <= camera < num_cameras:
            raise ValueError(f"camera {camera} is not a camera of {task!r}: its model has cameras 0..{num_cameras - 1} "
                             "(-1: the free camera); None picks the domain's default")
        self.state_layout = [(k, int(np.prod(np.shape(v)))) for k, v in time_step.observation.items()]
        state_dim = sum(n for _, n in self.state_layout)
        physics_dim = self.physics_dim = mujoco.mj_stateSize(probe.physics.model.ptr, PHYSICS_STATE)
        steps = math.ceil(probe._step_limit) if math.isfinite(probe._step_limit) else 1000
        self.episode_length = episode_length or max(1, steps // action_repeat)
        self.control_timestep = float(probe.control_timestep()) * action_repeat
        del probe
        self.cfg = EnvConfig(task, obs, image_size, camera, action_repeat, floor, self.episode_length, num_envs)

        shapes = {"action": ((num_envs, action_dim), np.float32), "reward": ((num_envs,), np.float64),
                  "terminated": ((num_envs,), np.bool_), "truncated": ((num_envs,), np.bool_),
                  "episode": ((num_envs,), np.int64), "step": ((num_envs,), np.int64)}
        if "pixels" in obs:
            shapes["pixels"] = ((num_envs, 3, image_size, image_size), np.uint8)
        if "state" in obs:
            shapes["state"] = ((num_envs, state_dim), np.float32)
        if "physics" in obs:
            shapes["physics"] = ((num_envs, physics_dim), np.float64)

        set_env_specs(self, obs, num_envs, image_size, action_dim, state_dim, physics_dim)
        seeds = env_seeds(seed, num_envs)
        if num_workers is None:
            num_workers = 0 if num_envs == 1 else min(num_envs, mp.cpu_count())
        elif isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0: every env in this process) or None, "
                             f"got {num_workers!r}")
        self.num_workers = min(num_workers, num_envs)
        self._shms: list[shared_memory.SharedMemory] = []
        self._conns, self._procs, self._slots = [], [], None
        if self.num_workers == 0:
            self._arrays = {k: np.zeros(s, dtype=d) for k, (s, d) in shapes.items()}
            self._slots = _Slots(self.cfg, list(range(num_envs)), seeds, self._arrays)
            self._closed = False
        else:
            self._closed = False
            try:
                self._start_workers(shapes, seeds)
            except BaseException:
                self.close()
                raise
        atexit.register(self.close)

    # ----------------------------------------------------------------------------------------- setup
    def _start_workers(self, shapes, seeds) -> None:
        self._arrays = {}
        specs = {}
        for key, (shape, dtype) in shapes.items():
            nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
            shm = shared_memory.SharedMemory(create=True, size=nbytes)
            self._shms.append(shm)
            self._arrays[key] = np.ndarray(shape, dtype=dtype, buffer=shm.buf)
            specs[key] = (shm.name, shape, dtype)
        # fork: workers start in milliseconds and need no `if __name__ == "__main__"` guard in user
        # scripts; they only run numpy and MuJoCo (no torch), and each builds its own GL context.
        # Once this process has rendered, a forked child would inherit a dead EGL display: spawn.
        fork_ok = "fork" in mp.get_all_start_methods() and not _RENDERED_IN_THIS_PROCESS
        ctx = mp.get_context("fork" if fork_ok else "spawn")
        groups = np.array_split(np.arange(self.num_envs), self.num_workers)
        for ids in groups:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, self.cfg, ids.tolist(), [seeds[i] for i in ids], specs),
                               daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            self._gather()
        except RuntimeError as err:
            if fork_ok:
                raise
            raise RuntimeError(
                f"{err}\nWorkers were spawned (not forked) because this process has already rendered "
                "frames. A spawned worker re-imports the main script: guard it with "
                "`if __name__ == '__main__':`, or create worker envs before any single-process env, "
                "or pass num_workers=0."
            ) from err

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise closed_env_error(self.task.name)

    def _broadcast(self, cmd: str, arg=None) -> None:
        self._check_open()
        if self._slots is not None:
            if cmd == "reset":
                self._slots.reset(arg)
            elif cmd == "step":
                self._slots.step()
            elif cmd == "seed":
                self._slots.seed(arg)
            elif cmd == "set_state":
                self._slots.set_state(arg)
            return
        for conn, proc in zip(self._conns, self._procs, strict=True):
            try:
                conn.send((cmd, arg))
            except (BrokenPipeError, OSError) as err:
                raise RuntimeError(f"a dm_control worker of this env is gone (pid {proc.pid}, exit code "
                                   f"{proc.exitcode}); this env cannot go on: close it and make a new one") from err
        self._gather(cmd)

    def _gather(self, cmd: str = "start") -> None:
        errors = []
        for conn, proc in zip(self._conns, self._procs, strict=True):
            try:
                status, msg = conn.recv()
            except EOFError:
                status, msg = "error", f"worker {proc.pid} died (exit code {proc.exitcode})"
            if status != "ok":
                errors.append(msg)
        if errors:
            raise RuntimeError(f"dm_control worker failed during {cmd!r}: " + "\n".join(errors))

    # ---------------------------------------------------------------------------------------- TorchRL
    def _observation_td(self) -> TensorDict:
        a, out = self._arrays, {}
        for key in ("pixels", "state", "physics", "episode", "step"):
            if key in a:
                out[key] = torch.from_numpy(a[key].copy())
        return TensorDict(out, batch_size=self.batch_size).to(self.device)

    def _reset(self, tensordict: TensorDict | None = None, **kwargs) -> TensorDict:
        mask = None
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict["_reset"].reshape(self.num_envs).cpu().numpy()
            if not mask.any():
                return self._observation_td().update(self._done_td(False))
        self._broadcast("reset", mask)
        return self._observation_td().update(self._done_td(False))

    def _done_td(self, value: bool) -> dict:
        z = torch.full((self.num_envs, 1), value, dtype=torch.bool, device=self.device)
        return {"done": z, "terminated": z.clone(), "truncated": z.clone()}

    def _step(self, tensordict: TensorDict) -> TensorDict:
        self._check_open()
        action = check_action(tensordict.get("action"), (self.num_envs, self.action_dim))
        tensordict.set("action", action)  # what the physics runs, so that whatever stores the step stores that
        self._arrays["action"][:] = action.cpu().numpy()
        self._broadcast("step")
        out = self._observation_td()
        a = self._arrays
        terminated = torch.from_numpy(a["terminated"].copy()).reshape(-1, 1)
        truncated = torch.from_numpy(a["truncated"].copy()).reshape(-1, 1)
        out.update({
            "reward": torch.from_numpy(a["reward"].astype(np.float32)).reshape(-1, 1),
            "terminated": terminated,
            "truncated": truncated,
            "done": terminated | truncated,
        })
        return out.to(self.device)

    def _set_seed(self, seed: int | None) -> int | None:
        self._check_open()
        seeds = env_seeds(0 if seed is None else seed, self.num_envs)
        if self._slots is not None:
            self._slots.seed(seeds)
        else:
            groups = np.array_split(np.arange(self.num_envs), self.num_workers)
            for conn, ids in zip(self._conns, groups, strict=True):
                conn.send(("seed", [seeds[i] for i in ids]))
            self._gather("seed")
        return seed

    # ------------------------------------------------------------------------------------ extras
    def set_physics_state(self, states: torch.Tensor | np.ndarray) -> TensorDict:
        """Put every env in the given physics states ``[N, P]`` and return the observations there.

        Used to render goal frames at chosen poses and to replay stored states.
        """
        self._check_open()
        states = check_physics_states(states, self.num_envs, self.physics_dim).cpu().numpy()
        self._broadcast("set_state", states)
        return self._observation_td()

    def close(self, *, raise_if_closed: bool = False) -> None:  # noqa: D102
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self._slots is not None:
            self._slots.close()
        for conn in self._conns:
            try:
                conn.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        for shm in self._shms:
            shm.close()
            shm.unlink()
        self._shms = []
        try:
            super().close(raise_if_closed=False)
        except TypeError:
            super().close()
