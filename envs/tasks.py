"""Tasks: reward functions of the MuJoCo physics state, by name.

A task name is ``"<domain>-<task>"``: every dm_control suite task (``walker-walk``,
``ball_in_cup-catch``, ...) plus the zero-shot evaluation tasks of the TD-JEPA / ExoRL protocol
defined in :mod:`latentrl.envs.custom_tasks` (``walker-spin``, ``cheetah-run_backward``,
``quadruped-jump``, ``point_mass_maze-reach_top_left``, ...).

Because a reward is a function of the physics state, any stored transition can be relabelled
with any task of its domain later (:meth:`Task.rewards_from_states`): the basis of zero-shot
evaluation on rewards never seen in training. Where the body is (coverage cells, goal distances)
is defined here too, once per task: :meth:`Task.body_position`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import mujoco
import numpy as np
from dm_control import suite
from dm_control.rl import control

from latentrl.envs import custom_tasks

__all__ = [
    "PHYSICS_STATE", "Task", "ZERO_SHOT_TASKS", "body_position", "get_physics_state", "get_task",
    "list_domain_tasks", "list_tasks", "resolve_task_list", "set_physics_state",
]

# mj_getState spec of the ``physics`` key: qpos, qvel, act (and the history buffers); it starts with qpos.
PHYSICS_STATE = mujoco.mjtState.mjSTATE_PHYSICS

# Per-domain default camera (quadruped's camera 0 looks at a corner; ExoRL/URLB render camera 2).
DEFAULT_CAMERA = {"quadruped": 2}


def get_physics_state(physics) -> np.ndarray:
    """The full physics state ``[P]`` (float64) of a dm_control ``Physics``."""
    model, data = physics.model.ptr, physics.data.ptr
    out = np.empty(mujoco.mj_stateSize(model, PHYSICS_STATE), dtype=np.float64)
    mujoco.mj_getState(model, data, out, PHYSICS_STATE)
    return out


def set_physics_state(physics, state: np.ndarray, action: np.ndarray | None = None) -> None:
    """Set ``state`` ``[P]`` (and the control) and recompute every derived quantity a reward reads.

    As in the TD-JEPA / Meta Motivo relabeller: ``mj_forward`` then the position, velocity-sensor
    and subtree-velocity stages, so ``subtree_linvel``/``subtree_angmom`` and sensors are current.
    """
    model, data = physics.model.ptr, physics.data.ptr
    mujoco.mj_setState(model, data, np.asarray(state, dtype=np.float64), PHYSICS_STATE)
    # The control is not part of the physics state; rewards with a control term read it.
    data.ctrl[:] = 0.0 if action is None else np.asarray(action, dtype=np.float64)[: model.nu]
    mujoco.mj_forward(model, data)
    mujoco.mj_fwdPosition(model, data)
    mujoco.mj_sensorVel(model, data)
    mujoco.mj_subtreeVel(model, data)


def _suite_loader(domain: str, task: str) -> Callable[..., control.Environment]:
    def load(time_limit=None, random=None, environment_kwargs=None):
        task_kwargs = {"random": random}
        if time_limit is not None:
            task_kwargs["time_limit"] = time_limit
        return suite.load(domain, task, task_kwargs=task_kwargs, environment_kwargs=environment_kwargs)

    return load


def _all_loaders() -> dict[str, Callable[..., control.Environment]]:
    loaders = {f"{d}-{t}": _suite_loader(d, t) for d, t in suite.ALL_TASKS}
    for (domain, task), loader in custom_tasks.CUSTOM_TASKS.items():
        loaders[f"{domain}-{task}"] = loader
    return loaders


_LOADERS = _all_loaders()


@functools.cache
def _body_qpos_index(name: str) -> tuple[int, ...]:
    """``qpos`` indices of the root body's position: a free joint's x and y, else the slide joints
    along x (and y) of non-world bodies (cheetah, walker: x; point_mass: x and y). METRA's definition."""
    model = Task(name).make_dm_env(seed=0).physics.model.ptr
    for j in range(model.njnt):
        if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_FREE:
            adr = int(model.jnt_qposadr[j])
            return (adr, adr + 1)
    found: dict[int, int] = {}
    for j in range(model.njnt):
        if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_SLIDE and model.jnt_bodyid[j] != 0:
            axis = np.abs(model.jnt_axis[j])
            for i in (0, 1):
                if axis[i] > 0.99 and i not in found:
                    found[i] = int(model.jnt_qposadr[j])
    if 0 not in found:
        raise ValueError(f"task {name!r} has no free joint and no x slide joint: its body has no position to "
                         "measure (coverage and goal distances need one)")
    return tuple(found[i] for i in sorted(found))


_GOAL_RADIUS = {"point_mass": 0.05, "reacher": 0.05}
"""Per-domain :attr:`Task.goal_radius` (the default 1 m is for bodies that travel)."""


@functools.cache
def _end_effector_body(name: str) -> int:
    """The body whose x-y is the position of a robot fixed to the world (reacher's finger): the deepest body of
    the kinematic tree, which must be unique. Raises when the model has none (no moving body)."""
    model = Task(name).make_dm_env(seed=0).physics.model.ptr
    depth = [0] * model.nbody
    for b in range(1, model.nbody):
        depth[b] = depth[model.body_parentid[b]] + 1
    deepest = [b for b in range(model.nbody) if depth[b] == max(depth)]
    if max(depth) == 0 or len(deepest) != 1:
        raise ValueError(f"task {name!r}: its body has no position to measure (no free or slide joint, and no single "
                         "end of its kinematic chain); coverage and goal distances need one")
    return deepest[0]


@dataclass(frozen=True)
class Task:
    """A named task: how to build its dm_control environment and its reward of the physics state."""

    name: str

    @property
    def domain(self) -> str:
        return self.name.split("-", 1)[0]

    @property
    def task(self) -> str:
        return self.name.split("-", 1)[1]

    @property
    def default_camera(self) -> int:
        return DEFAULT_CAMERA.get(self.domain, 0)

    def make_dm_env(self, seed: int | np.random.RandomState | None = None, time_limit: float | None = None,
                    environment_kwargs: dict | None = None) -> control.Environment:
        """A fresh dm_control ``Environment`` of this task (``seed`` drives its initial states)."""
        random = seed if isinstance(seed, np.random.RandomState) else np.random.RandomState(seed)
        return _LOADERS[self.name](time_limit=time_limit, random=random, environment_kwargs=environment_kwargs)

    @cached_property
    def _relabel_env(self) -> control.Environment:
        env = self.make_dm_env(seed=0)
        env.reset()
        return env

    @property
    def physics_size(self) -> int:
        """Length ``P`` of this task's physics states (the ``physics`` key): its model's ``mjSTATE_PHYSICS`` size."""
        return int(mujoco.mj_stateSize(self._relabel_env.physics.model.ptr, PHYSICS_STATE))

    @property
    def body_qpos_index(self) -> tuple[int, ...]:
        """Indices into ``qpos`` (so into the ``physics`` key, which starts with it) of the body's
        position: ``(x, y)`` of a free joint (quadruped, humanoid), else the slide joints along x and y
        (cheetah and walker: x alone; point_mass: x and y). Raises for a body fixed to the world."""
        return _body_qpos_index(self.name)

    @property
    def goal_radius(self) -> float:
        """The distance between body positions (:meth:`body_position`) that counts as a goal reached by default:
        1 m for bodies that travel (METRA's goal protocol), 0.05 for the tabletop arenas: point_mass's arena is
        0.6 m across (the active inference spec's success radius) and reacher's fingertip reaches 0.22 m from
        the centre (0.05 is the easy target's radius)."""
        return _GOAL_RADIUS.get(self.domain, 1.0)

    def body_position(self, physics):
        """Where the body is: ``physics`` ``[..., P]`` -> ``[..., k]`` (``k`` = 1 for planar runners, else 2),
        the one definition behind coverage cells, goal distances and zero-shot goal success.

        A robot fixed to the world (reacher) has no body position in ``qpos``: its end effector's x-y (the
        deepest body of the kinematic tree, reacher's finger) is computed by forward kinematics instead.

        NumPy in, float64 NumPy out; a torch tensor in, a tensor out on its device.
        """
        try:
            index = list(self.body_qpos_index)
        except ValueError:
            return self._end_effector_position(physics)
        if isinstance(physics, np.ndarray):
            return np.asarray(physics, dtype=np.float64)[..., index]
        import torch

        if isinstance(physics, torch.Tensor):
            return physics[..., index]
        return np.asarray(physics, dtype=np.float64)[..., index]

    def _end_effector_position(self, physics):
        """``body_position`` of a robot fixed to the world: its end effector's x-y ``[..., 2]`` by kinematics."""
        body = _end_effector_body(self.name)  # raises for a model without one
        model = self._relabel_env.physics.model.ptr
        import torch

        as_tensor = isinstance(physics, torch.Tensor)
        states = (physics.detach().cpu().numpy() if as_tensor else np.asarray(physics)).astype(np.float64)
        flat = states.reshape(-1, states.shape[-1])
        data = mujoco.MjData(model)
        out = np.empty((len(flat), 2))
        for i, state in enumerate(flat):
            data.qpos[:] = state[:model.nq]
            mujoco.mj_kinematics(model, data)
            out[i] = data.xpos[body, :2]
        out = out.reshape(*states.shape[:-1], 2)
        return torch.as_tensor(out, dtype=physics.dtype, device=physics.device) if as_tensor else out

    def reward(self, physics) -> float:
        """The task reward of a dm_control ``physics`` whose derived quantities are current."""
        return float(self._relabel_env.task.get_reward(physics))

    def rewards_from_states(self, states: np.ndarray, actions: np.ndarray | None = None) -> np.ndarray:
        """Rewards ``[N]`` (float32) of physics states ``[N, P]`` (optionally with the controls ``[N, A]``).

        Note: tasks whose target lives in the model rather than the physics state (reacher's and
        manipulator's randomised targets) are relabelled with the target of this task's own
        environment, not the one of the episode that stored the state.
        """
        env = self._relabel_env
        states = np.asarray(states, dtype=np.float64)
        expected = mujoco.mj_stateSize(env.physics.model.ptr, PHYSICS_STATE)
        if states.ndim != 2 or states.shape[1] != expected:
            raise ValueError(
                f"task {self.name!r} expects {self.domain} physics states of shape [N, {expected}], got "
                f"{list(states.shape)}; were they stored from another domain? Use a task of the data's domain"
            )
        if actions is not None:
            actions = np.asarray(actions)
            nu = env.physics.model.nu
            if actions.shape != (len(states), nu):
                raise ValueError(f"task {self.name!r} expects {self.domain} actions of shape [N, {nu}], got "
                                 f"{list(actions.shape)} (with {len(states)} states); were they stored from another "
                                 "domain? Use a task of the data's domain")
        out = np.empty(len(states), dtype=np.float32)
        for i, state in enumerate(states):
            set_physics_state(env.physics, state, None if actions is None else actions[i])
            out[i] = env.task.get_reward(env.physics)
        return out


# The zero-shot evaluation tasks of the TD-JEPA / Meta Motivo protocol, per domain (``tasks=<domain>/all``).
ZERO_SHOT_TASKS: dict[str, list[str]] = {
    "walker": ["walker-stand", "walker-walk", "walker-run", "walker-spin"],
    "cheetah": ["cheetah-walk", "cheetah-run", "cheetah-walk_backward", "cheetah-run_backward"],
    "quadruped": ["quadruped-stand", "quadruped-walk", "quadruped-run", "quadruped-jump"],
    "point_mass_maze": [f"point_mass_maze-{t}" for t in (
        "reach_top_left", "reach_top_right", "reach_bottom_left", "reach_bottom_right",
        "reach_bottom_left_long", "loop", "square", "fast_slow")],
}


def resolve_task_list(spec: str) -> list[str]:
    """``"walker/all"`` -> the domain's zero-shot tasks (or all its tasks outside the protocol);
    ``"walker-run,walker-walk"`` -> those tasks. Unknown names raise with the closest valid ones."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part.endswith("/all"):
            domain = part[: -len("/all")]
            names += ZERO_SHOT_TASKS.get(domain) or list_domain_tasks(domain)
        else:
            names.append(get_task(part).name)
    if not names:
        raise ValueError(f"no tasks in {spec!r}; use '<domain>/all' or comma-separated task names")
    return list(dict.fromkeys(names))


def list_tasks(domain: str | None = None) -> list[str]:
    """Every task name, or those of one domain."""
    names = sorted(_LOADERS)
    return [n for n in names if domain is None or n.split("-", 1)[0] == domain]


def list_domain_tasks(domain: str) -> list[str]:
    """Task names of ``domain`` (raises on an unknown domain)."""
    names = list_tasks(domain)
    if not names:
        domains = sorted({n.split("-", 1)[0] for n in _LOADERS})
        close = difflib.get_close_matches(domain, domains, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown domain {domain!r}.{hint} Valid domains: {', '.join(domains)}")
    return names


def body_position(task: str | Task, physics):
    """``get_task(task).body_position(physics)``: the body's x (and y) ``[..., k]`` from ``physics`` ``[..., P]``."""
    return (task if isinstance(task, Task) else get_task(task)).body_position(physics)


def get_task(name: str) -> Task:
    """The task called ``name`` (``"walker-walk"``); an unknown name lists the closest valid ones."""
    if not isinstance(name, str):
        raise ValueError(f"a task name is a str such as 'walker-walk', got {name!r}; "
                         "latentrl.envs.list_tasks() names all of them")
    if name not in _LOADERS:
        close = difflib.get_close_matches(name, _LOADERS, n=5, cutoff=0.5)
        if not close and "-" in name:
            close = list_tasks(name.split("-", 1)[0])[:10]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown task {name!r}.{hint} Task names are '<domain>-<task>'; "
            "latentrl.envs.list_tasks() names all of them."
        )
    return Task(name)
