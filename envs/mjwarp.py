"""MuJoCo Warp backend: ``num_envs`` worlds of one task stepped and rendered in one batch (GPU or CPU).

All worlds live in one MuJoCo Warp ``Data`` (``mujoco_warp.put_data(model, data, nworld=N)``) and step
together (``mujoco_warp.step``); frames come from MuJoCo Warp's batch ray-tracing renderer
(``create_render_context`` / ``refit_bvh`` / ``render``), which runs on the GPU and, through Warp's
LLVM backend, on the CPU. Pixels, states and physics reach torch as views of the warp arrays
(``wp.to_torch``, no host copy); rewards and ``state`` observations are the batched torch functions of
:mod:`latentrl.envs.batched_tasks`, checked against dm_control's in ``tests/test_mjwarp.py``.

What matches the ``dmc`` backend (:class:`latentrl.envs.dmc.DMCEnv`): keys, dtypes and specs; episode
ids (env i's n-th episode is ``n * num_envs + i``) and steps; the action repeat (rewards summed);
truncation after ``episode_length`` agent steps; ``_reset`` masks that reset only those worlds;
``set_physics_state``; ``floor="gradient"``; default cameras. Each world draws its initial states on
the CPU with the dm_control task's own ``initialize_episode`` (one scratch dm_control env, the world's
own ``RandomState``, seeded as the ``dmc`` backend seeds env i), so world i starts its episodes where
dm_control env i does. A control step is dm_control's (legacy) step: ``step2``, ``n_sub_steps - 1``
full steps, then ``step1`` so that positions, velocities and sensors are current for the reward,
observation and frame (acceleration-stage sensors keep the values of the step, as in dm_control).

What differs: MuJoCo Warp computes in float32 (dm_control in float64), so trajectories drift apart
slowly (see the tolerances in ``tests/test_mjwarp.py``); frames are ray traced (no shadows,
reflections or anti-aliasing, like the ``dmc`` backend's fast path, but the shading differs); a
world whose state turns non-finite or overflows MuJoCo Warp's contact / constraint buffers ends its
episode as ``terminated`` with reward 0 (dm_control would raise ``PhysicsError``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import mujoco
import mujoco_warp as mjw
import numpy as np
import torch
import warp as wp
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
from latentrl.envs.batched_tasks import BatchedTask, PhysicsBatch, make_batched_task
from latentrl.envs.tasks import PHYSICS_STATE, Task, get_physics_state, get_task

__all__ = ["MJWarpEnv", "PhysicsDivergedError"]

# Model fields that a task's ``initialize_episode`` changes per episode, per domain: uploaded per world.
_EPISODE_MODEL_FIELDS = {"reacher": ("geom_pos",)}
# (model, device) pairs whose kernels this process has loaded; the first use of each prints a note.
_LOADED: set[tuple[str, str]] = set()


@wp.kernel
def _copy_columns(src: wp.array2d(dtype=float), columns: wp.array(dtype=int), dst: wp.array2d(dtype=float)):
    world, k = wp.tid()
    dst[world, columns[k]] = src[world, columns[k]]


def _warp_device(device: torch.device) -> wp.context.Device:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={str(device)!r} but this torch has no CUDA device; use device='cpu' "
                               "(MuJoCo Warp then runs on the CPU through Warp's LLVM backend)")
        return wp.get_device(f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}")
    if device.type == "cpu":
        return wp.get_device("cpu")
    raise ValueError(f"backend='mjwarp' runs on 'cpu' or 'cuda' devices, got {str(device)!r}")


class PhysicsDivergedError(RuntimeError):
    """A world's physics went non-finite in ``sync_free`` mode, where it cannot be reset at once."""


class MJWarpEnv(EnvBase):
    """``num_envs`` worlds of one task in one MuJoCo Warp batch, as a TorchRL env (``batch_size=[num_envs]``).

    Same keys, specs and semantics as :class:`latentrl.envs.dmc.DMCEnv`: ``pixels`` uint8
    [N, 3, H, W], ``state`` float32 [N, D] (dm_control's observation dict flattened in its key order,
    :attr:`state_layout`), ``physics`` float64 [N, P] (``mj_getState`` ``mjSTATE_PHYSICS`` layout:
    qpos, qvel, act), ``episode`` / ``step`` int64 [N], ``action`` float32 [N, A] in [-1, 1],
    ``("next", "reward")`` float32 [N, 1] summed over the action repeat, ``terminated`` /
    ``truncated`` / ``done`` bool [N, 1]. Everything stays on ``device``.

    The first env of a model on a device compiles Warp kernels (about a minute on a CPU; cached in
    Warp's kernel cache afterwards). On CUDA a control step and a frame each run as one CUDA graph.

    ``sync_free = True`` (set by the trainer's GPU loop, ``collector.inline_steps`` > 1) steps without
    reading anything on the host: the action's finiteness check becomes a per-world count on the device
    (non-finite rows run a zero action), TorchRL's per-step "any env done?" read becomes the host's own
    count of steps (every world truncates after ``episode_length`` steps; worlds only terminate when their
    physics diverges), and :meth:`check_deferred`, called once per batch of steps, raises for either. A
    world that diverged is not reset in this mode: the run stops at the next check with its step.
    """

    sync_free: bool = False

    def __init__(self, task: str, *, obs=("pixels", "state"), image_size: int = 64, camera: int | None = None,
                 action_repeat: int = 1, num_envs: int = 1, seed: int = 0, floor: str = "default",
                 episode_length: int | None = None, device: str | torch.device = "cpu"):
        obs = check_env_args(obs, floor, action_repeat, num_envs, image_size, episode_length, seed)
        self.task: Task = get_task(task)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        self._wp_device = _warp_device(device)
        super().__init__(device=device, batch_size=torch.Size([num_envs]))
        self.num_envs, self.obs_keys, self.image_size = num_envs, obs, image_size
        self.action_repeat = action_repeat
        self.camera = self.task.default_camera if camera is None else camera

        # The scratch env draws every world's initial states (its task's RandomState swapped per world).
        self._scratch = self.task.make_dm_env(seed=0, time_limit=float("inf"))
        self._scratch.reset()  # sets per-task model constants (reacher's target size) before the upload
        self._batched = make_batched_task(task, self._scratch, device)
        self.state_layout = self._batched.state_layout
        probe = self.task.make_dm_env(seed=0)
        steps = math.ceil(probe._step_limit) if math.isfinite(probe._step_limit) else 1000
        self.episode_length = episode_length or max(1, steps // action_repeat)
        self.control_timestep = float(probe.control_timestep()) * action_repeat
        self._n_sub_steps = int(self._scratch._n_sub_steps)
        del probe

        mjm = self._scratch.physics.model.ptr
        if not -1 <= self.camera < mjm.ncam:
            raise ValueError(f"camera {self.camera} is not a camera of {task!r}: its model has cameras "
                             f"0..{mjm.ncam - 1} (-1: the free camera); None picks the domain's default")
        if floor == "gradient":
            apply_gradient_floor(mjm, self.task.domain)  # before the upload: the worlds render this model
        self._nq, self._nv, self._na, self._nu = mjm.nq, mjm.nv, mjm.na, mjm.nu
        physics_dim = mujoco.mj_stateSize(mjm, PHYSICS_STATE)
        if physics_dim != mjm.nq + mjm.nv + mjm.na:
            raise ValueError(f"task {task!r}: its physics state holds more than qpos, qvel and act "
                             "(history or plugin state), which the mjwarp backend does not copy")
        self._episode_fields = _EPISODE_MODEL_FIELDS.get(self.task.domain, ())
        # Geoms fixed to the world whose placement an episode may change (reacher's target).
        world_fixed = (mjm.body_weldid[mjm.geom_bodyid] == 0) & (mjm.body_mocapid[mjm.body_rootid[mjm.geom_bodyid]] < 0)
        self._static_geoms = np.nonzero(world_fixed)[0] if "geom_pos" in self._episode_fields else np.zeros(0, int)
        self._rk4 = int(mjm.opt.integrator) == int(mujoco.mjtIntegrator.mjINT_RK4)
        acc = np.nonzero(mjm.sensor_needstage == int(mujoco.mjtStage.mjSTAGE_ACC))[0]
        acc_columns = np.concatenate([np.arange(mjm.sensor_adr[i], mjm.sensor_adr[i] + mjm.sensor_dim[i])
                                      for i in acc]) if len(acc) else np.zeros(0)

        self._announce_compile()
        started = time.perf_counter()
        with wp.ScopedDevice(self._wp_device):
            self._m = mjw.put_model(mjm, batch_sizes={f: num_envs for f in self._episode_fields} or None)
            self._d = mjw.put_data(mjm, self._scratch.physics.data.ptr, nworld=num_envs)
            self._acc_columns = wp.array(acc_columns.astype(np.int32), dtype=int)
            self._sensor_backup = wp.zeros_like(self._d.sensordata)
            self._rc = None
            if "pixels" in obs:
                self._rc = mjw.create_render_context(
                    mjm, nworld=num_envs, cam_res=(image_size, image_size), render_rgb=True, render_depth=False,
                    cam_active=[self.camera], use_shadows=False, render_skybox=True,
                    enable_specular=False)  # closer to MuJoCo's OpenGL frames of these scenes, and cheaper
        self._view = PhysicsBatch(**{f: wp.to_torch(getattr(self._d, f)) for f in PhysicsBatch.__dataclass_fields__})
        self._geom_xmat = wp.to_torch(self._d.geom_xmat)
        self._time = wp.to_torch(self._d.time)
        self._warmstart = wp.to_torch(self._d.qacc_warmstart)
        self._overflow = wp.to_torch(self._d.overflow)
        self._model_views = {f: wp.to_torch(getattr(self._m, f)) for f in self._episode_fields}
        self._scratch_model = mjm

        # CUDA: warp and torch work share one stream, so no step waits on the host.
        self._torch_stream = wp.stream_to_torch(self._wp_device) if device.type == "cuda" else None
        self._use_graphs = device.type == "cuda"
        self._graphs: dict[str, object] = {}
        with self._on_device():  # compiles (or loads) every kernel a reset, a step and a frame use
            self._forward()
            self._control_step_kernels()
            if self._rc is not None:
                self._render_kernels()
                self._pixels()
            self._batched.reward(self._view)
        if time.perf_counter() - started > 5:
            print(f"[latentrl] MuJoCo Warp kernels for {self.task.domain} ready on {self._wp_device} after "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

        set_env_specs(self, obs, num_envs, image_size, mjm.nu, sum(n for _, n in self.state_layout), physics_dim)
        # as DMCEnv: world i draws like dm_control env i
        self._randoms = [np.random.RandomState(s) for s in env_seeds(seed, num_envs)]
        self._num_episodes = np.zeros(num_envs, dtype=np.int64)
        self._episode = torch.full((num_envs,), -1, dtype=torch.int64, device=device)
        self._step_count = torch.zeros(num_envs, dtype=torch.int64, device=device)
        self._host_steps = np.zeros(num_envs, dtype=np.int64)  # _step_count as the host counts it (sync_free)
        self._bad_actions = torch.zeros(num_envs, dtype=torch.int64, device=device)  # since check_deferred()
        self._diverged = torch.zeros(num_envs, dtype=torch.bool, device=device)
        self._other_tasks: dict[str, BatchedTask] = {}
        self._closed = False

    # ----------------------------------------------------------------------------------------- setup
    def _announce_compile(self) -> None:
        key = (self.task.domain, str(self._wp_device))
        if key not in _LOADED:
            _LOADED.add(key)
            where = "a CPU" if self._wp_device.is_cpu else "a GPU"
            print(f"[latentrl] MuJoCo Warp: loading kernels for {self.task.domain} on {self._wp_device}. The first "
                  f"use of a model on a device compiles them (about 1-2 minutes on {where}, more with pixels); "
                  f"later runs load them from Warp's cache ({wp.config.kernel_cache_dir}) in seconds.",
                  file=sys.stderr, flush=True)

    # -------------------------------------------------------------------------------------- physics
    @contextlib.contextmanager
    def _on_device(self):
        """Run warp launches on the env's device; on CUDA, run torch work on warp's stream too."""
        if self._torch_stream is None:
            with wp.ScopedDevice(self._wp_device):
                yield
            return
        caller = torch.cuda.current_stream(self.device)
        self._torch_stream.wait_stream(caller)
        with wp.ScopedDevice(self._wp_device), torch.cuda.stream(self._torch_stream):
            yield
        caller.wait_stream(self._torch_stream)

    def _launch(self, name: str, fn) -> None:
        """Run ``fn`` (warp launches only); on CUDA, as a CUDA graph captured on its first call."""
        if not self._use_graphs:
            fn()
            return
        graph = self._graphs.get(name)
        if graph is None:
            try:
                with wp.ScopedCapture(device=self._wp_device, force_module_load=False) as capture:
                    fn()
            except Exception as err:  # noqa: BLE001 - fall back to plain launches, which are correct
                print(f"[latentrl] MuJoCo Warp: CUDA graph capture failed ({err}); running without graphs",
                      file=sys.stderr, flush=True)
                self._use_graphs = False
                fn()
                return
            graph = self._graphs[name] = capture.graph
        wp.capture_launch(graph)

    def _control_step_kernels(self) -> None:
        """One control step: dm_control's legacy ``physics.step`` (step2, n-1 steps, step1)."""
        m, d = self._m, self._d
        if self._rk4:  # step2 would integrate with Euler; dm_control takes full RK4 steps then
            for _ in range(self._n_sub_steps):
                mjw.step(m, d)
        else:
            mjw.step2(m, d)
            for _ in range(self._n_sub_steps - 1):
                mjw.step(m, d)
        if self._acc_columns.shape[0]:
            wp.copy(self._sensor_backup, d.sensordata)
        mjw.step1(m, d)  # zeroes sensordata: acceleration-stage sensors get the step's values back
        if self._acc_columns.shape[0]:
            wp.launch(_copy_columns, dim=(d.nworld, self._acc_columns.shape[0]),
                      inputs=[self._sensor_backup, self._acc_columns], outputs=[d.sensordata])
        if self._batched.needs_subtree_vel:
            mjw.subtree_vel(m, d)

    def _render_kernels(self) -> None:
        mjw.refit_bvh(self._m, self._d, self._rc)
        mjw.render(self._m, self._d, self._rc)

    def _forward(self) -> None:
        mjw.forward(self._m, self._d)
        if self._batched.needs_subtree_vel:
            mjw.subtree_vel(self._m, self._d)

    def _pixels(self) -> torch.Tensor:
        """The frames ``[N, 3, H, W]`` uint8 from the renderer's packed ``0xAARRGGBB`` words."""
        n, s = self.num_envs, self.image_size
        packed = wp.to_torch(self._rc.rgb_data)[:, : s * s]
        bgra = packed.contiguous().view(torch.uint8).view(n, s, s, 4)
        return bgra[..., [2, 1, 0]].permute(0, 3, 1, 2).contiguous()

    def _physics(self) -> torch.Tensor:
        v = self._view
        return torch.cat([v.qpos, v.qvel, v.act], dim=-1).to(torch.float64)

    def _set_worlds(self, index: torch.Tensor, states: torch.Tensor) -> None:
        """Write physics states ``[K, P]`` into worlds ``index`` with zero control, as ``mj_setState`` + reset."""
        v, nq, nv = self._view, self._nq, self._nv
        states = states.to(self.device, torch.float32)
        v.qpos[index] = states[:, :nq]
        v.qvel[index] = states[:, nq:nq + nv]
        if self._na:
            v.act[index] = states[:, nq + nv:]
        v.ctrl[index] = 0.0
        self._time[index] = 0.0
        self._warmstart[index] = 0.0
        self._overflow[index] = 0

    # ------------------------------------------------------------------------------------- TorchRL
    def _observation_td(self) -> TensorDict:
        out = {}
        if "pixels" in self.obs_keys:
            out["pixels"] = self._pixels()
        if "state" in self.obs_keys:
            out["state"] = self._batched.observe(self._view)
        if "physics" in self.obs_keys:
            out["physics"] = self._physics()
        out["episode"] = self._episode.clone()
        out["step"] = self._step_count.clone()
        return TensorDict(out, batch_size=self.batch_size, device=self.device)

    def _done_td(self, value: bool) -> dict:
        z = torch.full((self.num_envs, 1), value, dtype=torch.bool, device=self.device)
        return {"done": z, "terminated": z.clone(), "truncated": z.clone()}

    def _draw_initial_states(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
        """Each world's next initial state, drawn by the dm_control task with the world's RandomState.

        Returns physics states ``[K, P]``, dm_control's sensor readings there ``[K, nsensordata]``, the
        per-episode model fields (``{name: [K, ...]}``) and the poses of world-fixed geoms ``[K, G, 12]``.
        """
        physics, model = self._scratch.physics, self._scratch_model
        states = np.empty((len(ids), self._nq + self._nv + self._na))
        sensors = np.empty((len(ids), model.nsensordata))
        fields = {f: np.empty((len(ids), *getattr(model, f).shape)) for f in self._episode_fields}
        static = self._static_geoms
        static_pose = np.empty((len(ids), len(static), 12))
        for k, i in enumerate(ids):
            self._scratch.task._random = self._randoms[i]
            self._scratch.reset()
            states[k] = get_physics_state(physics)
            sensors[k] = physics.data.sensordata  # dm_control's reset forward runs with actuation off
            for f in fields:
                fields[f][k] = getattr(model, f)
            static_pose[k, :, :3] = physics.data.geom_xpos[static]
            static_pose[k, :, 3:] = physics.data.geom_xmat[static]
        return states, sensors, fields, static_pose

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise closed_env_error(self.task.name)

    def _reset(self, tensordict: TensorDict | None = None, **kwargs) -> TensorDict:
        self._check_open()
        mask = None
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict["_reset"].reshape(self.num_envs).to(self.device)
            if not bool(mask.any()):
                return self._observation_td().update(self._done_td(False))
        ids = np.arange(self.num_envs) if mask is None else mask.nonzero().reshape(-1).cpu().numpy()
        states, sensors, fields, static_pose = self._draw_initial_states(ids)
        index = torch.as_tensor(ids, device=self.device)
        episodes = self._num_episodes[ids] * self.num_envs + ids
        self._num_episodes[ids] += 1
        with self._on_device():
            self._episode[index] = torch.as_tensor(episodes, device=self.device)
            self._set_worlds(index, torch.from_numpy(states))
            for f, rows in fields.items():
                self._model_views[f][index] = torch.from_numpy(rows).to(self.device, torch.float32)
            if len(self._static_geoms):  # MuJoCo Warp poses geoms fixed to the world only once, in put_data
                pose = torch.from_numpy(static_pose).to(self.device, torch.float32)
                static = torch.as_tensor(self._static_geoms, device=self.device)
                self._view.geom_xpos[index[:, None], static] = pose[..., :3]
                self._geom_xmat[index[:, None], static] = pose[..., 3:].reshape(*pose.shape[:2], 3, 3)
            sensordata = self._view.sensordata
            backup = sensordata.clone()
            self._forward()
            backup[index] = torch.from_numpy(sensors).to(self.device, torch.float32)
            sensordata.copy_(backup)
            self._step_count[index] = 0
            self._host_steps[ids] = 0
            if self._rc is not None:
                self._launch("render", self._render_kernels)
            out = self._observation_td().update(self._done_td(False))
        return out

    def _step(self, tensordict: TensorDict) -> TensorDict:
        self._check_open()
        # one host sync: a non-finite action must not reach the worlds (they would diverge and end as terminated);
        # sync_free: those rows run a zero action and are counted for check_deferred()
        action = check_action(tensordict.get("action").to(self.device), (self.num_envs, self._nu),
                              finite=not self.sync_free)
        if self.sync_free:
            bad = ~torch.isfinite(action).all(-1)
            self._bad_actions += bad
            action = torch.where(bad[:, None], 0.0, action)
        tensordict.set("action", action)  # what the worlds run, so that whatever stores the step stores that
        with self._on_device():
            v = self._view
            v.ctrl.copy_(action.reshape(self.num_envs, self._nu))
            reward = torch.zeros(self.num_envs, dtype=torch.float32, device=self.device)
            for _ in range(self.action_repeat):
                self._launch("control_step", self._control_step_kernels)
                reward += self._batched.reward(v).to(torch.float32)
            self._step_count += 1
            self._host_steps += 1
            valid = torch.isfinite(v.qpos).all(-1) & torch.isfinite(v.qvel).all(-1) & (self._overflow == 0)
            terminated = ~valid
            truncated = valid & (self._step_count >= self.episode_length)
            reward = torch.where(valid, reward, 0.0)
            if self.sync_free:
                self._diverged |= terminated
            if self._rc is not None:
                self._launch("render", self._render_kernels)
            out = self._observation_td()
            out.update({"reward": reward.reshape(-1, 1), "terminated": terminated.reshape(-1, 1),
                        "truncated": truncated.reshape(-1, 1), "done": (terminated | truncated).reshape(-1, 1)})
        return out

    def maybe_reset(self, tensordict: TensorDict) -> TensorDict:
        """TorchRL's auto-reset after a step; ``sync_free``: decided by the host's step count, with no read of
        the done flags on the device (a diverged world is reported by :meth:`check_deferred` instead)."""
        if not self.sync_free:
            return super().maybe_reset(tensordict)
        if not (self._host_steps >= self.episode_length).any():
            return tensordict
        return self.reset(tensordict, select_reset_only=True)

    def check_deferred(self) -> None:
        """``sync_free``: raise for the non-finite actions and diverged worlds since the last call (one host
        read), naming the worlds; then start counting again."""
        bad, diverged = self._bad_actions.to("cpu", copy=True), self._diverged.to("cpu", copy=True)
        self._bad_actions.zero_()
        self._diverged.zero_()
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"the policy sent non-finite actions (NaN or inf) to env rows {rows[:10]} ({int(bad.sum())} steps "
                "since the last check; they ran a zero action). A NaN action usually means the policy's parameters "
                "or inputs went non-finite: fix the policy, or replace those values before env.step()")
        if bool(diverged.any()):
            rows = diverged.nonzero().flatten().tolist()
            raise PhysicsDivergedError(
                f"the physics of {self.task.name} worlds {rows[:10]} diverged (non-finite state or solver overflow) "
                "since the last check. With collector.inline_steps > 1 the env reads nothing per step and cannot "
                "reset a diverged world at once; rerun with collector.inline_steps=1 (those worlds then end as "
                "terminated and restart), or make the physics stable (action_repeat, the task's timestep)")

    def _set_seed(self, seed: int | None) -> int | None:
        self._check_open()
        self._randoms = [np.random.RandomState(s) for s in env_seeds(0 if seed is None else seed, self.num_envs)]
        return seed

    # ------------------------------------------------------------------------------------- extras
    def _check_states(self, states: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Physics states as float64 ``[N, P]``; a wrong shape is an error naming the expected one."""
        self._check_open()
        return check_physics_states(states, self.num_envs, self._nq + self._nv + self._na)

    def set_physics_state(self, states: torch.Tensor | np.ndarray) -> TensorDict:
        """Put every world in the given physics states ``[N, P]`` and return the observations there.

        As the ``dmc`` backend's: zero control, then the forward dynamics (``mj_forward`` and the
        subtree velocities), so rewards, observations and frames are those of the states.
        """
        states = self._check_states(states)
        with self._on_device():
            self._set_worlds(torch.arange(self.num_envs, device=self.device), states)
            self._forward()
            if self._rc is not None:
                self._launch("render", self._render_kernels)
            out = self._observation_td()
        return out

    def rewards_from_states(self, states: torch.Tensor | np.ndarray, actions: torch.Tensor | np.ndarray | None = None,
                            task: str | None = None) -> torch.Tensor:
        """Rewards ``[N]`` (float32) of physics states ``[N, P]`` with controls ``[N, A]`` (default zero).

        The batched counterpart of :meth:`latentrl.envs.Task.rewards_from_states`, computed on the
        worlds by this env's task or by ``task``, another task of its domain (zero-shot relabelling).
        Leaves the worlds in those states, as :meth:`set_physics_state` does; reacher's targets are
        those of the worlds' current episodes.
        """
        batched = self._batched if task is None or task == self.task.name else self._other_task(task)
        states = self._check_states(states)
        with self._on_device():
            self._set_worlds(torch.arange(self.num_envs, device=self.device), states)
            if actions is not None:
                actions = torch.as_tensor(actions).to(self.device, torch.float32)
                self._view.ctrl.copy_(actions.reshape(self.num_envs, self._nu))
            mjw.forward(self._m, self._d)
            if batched.needs_subtree_vel or self._batched.needs_subtree_vel:
                mjw.subtree_vel(self._m, self._d)
            return batched.reward(self._view).to(torch.float32)

    def _other_task(self, name: str) -> BatchedTask:
        task = get_task(name)
        if task.domain != self.task.domain:
            raise ValueError(f"task {name!r} is not of this env's domain {self.task.domain!r}")
        if name not in self._other_tasks:
            other, ours = task._relabel_env.physics.model.ptr, self._scratch_model
            sizes = ("nq", "nv", "na", "nu", "nbody", "ngeom", "nsite", "nsensordata")
            if any(getattr(other, k) != getattr(ours, k) for k in sizes):
                raise ValueError(f"task {name!r} runs on another model than {self.task.name!r} (e.g. more poles); "
                                 "its rewards cannot be computed on these worlds")
            self._other_tasks[name] = make_batched_task(name, task._relabel_env, self.device)
        return self._other_tasks[name]

    def close(self, *, raise_if_closed: bool = False) -> None:  # noqa: D102
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._graphs.clear()
        try:
            super().close(raise_if_closed=False)
        except TypeError:
            super().close()
