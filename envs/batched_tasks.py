"""Batched torch task functions: rewards and ``state`` observations of ``N`` physics states at once.

Each supported task has a reward ``PhysicsBatch -> [N]`` and its domain an observation
``PhysicsBatch -> [N, D]`` that flattens dm_control's observation dict in its own key order (the
``state`` key of both backends). They read batched MuJoCo quantities (``qpos``, ``xmat``,
``sensordata``, ...) from a :class:`PhysicsBatch`, which the MuJoCo Warp backend fills with zero-copy
views of its warp ``Data`` and tests fill from dm_control's ``MjData`` (float64), so the same code is
checked against dm_control's own ``get_reward`` / ``get_observation`` (``tests/test_mjwarp.py``).

The formulas are dm_control's (``suite/{walker,cheetah,quadruped,point_mass,reacher,cartpole}.py``) and
ours (:mod:`latentrl.envs.custom_tasks`); their parameters (speeds, heights, targets) are read from the
dm_control task object, so a task's batched reward cannot drift from its CPU definition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import mujoco
import numpy as np
import torch
from dm_control.rl import control
from dm_control.suite import cartpole, cheetah, point_mass, quadruped, reacher, walker

from latentrl.envs import custom_tasks
from latentrl.envs.tasks import list_tasks

__all__ = ["BatchedTask", "PhysicsBatch", "SUPPORTED_DOMAINS", "make_batched_task", "supported_tasks", "tolerance"]

SUPPORTED_DOMAINS = ("walker", "cheetah", "quadruped", "point_mass", "point_mass_maze", "reacher", "cartpole")
# Tasks of those domains that randomise what a batched model cannot hold per world (point_mass-hard:
# the tendon coefficients) or need geometry the batched tasks do not model (quadruped's terrain and ball).
_UNSUPPORTED = {
    "point_mass-hard": "it randomises the actuator-to-joint coefficients (tendon wrap_prm) per episode, "
                       "which MuJoCo Warp cannot batch per world",
    "quadruped-escape": "its heightfield terrain and rangefinders are not modelled by the batched tasks",
    "quadruped-fetch": "its ball and walls are not modelled by the batched tasks",
}


def supported_tasks() -> list[str]:
    """Task names the batched (MuJoCo Warp) backend supports."""
    return [n for n in list_tasks() if n.split("-", 1)[0] in SUPPORTED_DOMAINS and n not in _UNSUPPORTED]


# --------------------------------------------------------------------------------------------- data
@dataclass
class PhysicsBatch:
    """Batched MuJoCo quantities, leading dim ``[N]``, as in ``MjData`` (``xmat`` as ``[N, nbody, 3, 3]``).

    Rewards and observations read these fields after the position and velocity stages (and
    ``mj_subtreeVel`` for ``subtree_linvel`` / ``subtree_angmom``) have run, as dm_control's do.
    """

    qpos: torch.Tensor
    qvel: torch.Tensor
    act: torch.Tensor
    ctrl: torch.Tensor
    xpos: torch.Tensor
    xmat: torch.Tensor
    geom_xpos: torch.Tensor
    site_xpos: torch.Tensor
    sensordata: torch.Tensor
    subtree_com: torch.Tensor
    subtree_linvel: torch.Tensor
    subtree_angmom: torch.Tensor

    @classmethod
    def from_mujoco(cls, model: mujoco.MjModel, datas: Sequence[mujoco.MjData]) -> PhysicsBatch:
        """Stack ``MjData`` objects (float64) into a batch, e.g. to check batched functions against dm_control."""
        out = {}
        for f in fields(cls):
            rows = [np.asarray(getattr(d, f.name), dtype=np.float64) for d in datas]
            value = torch.from_numpy(np.stack(rows))
            if f.name == "xmat":
                value = value.reshape(len(datas), model.nbody, 3, 3)
            out[f.name] = value
        return cls(**out)


# ------------------------------------------------------------------------------------ reward shapes
def _sigmoid(x: torch.Tensor, value_at_1: float, sigmoid: str) -> torch.Tensor:
    """dm_control's ``rewards._sigmoids``: 1 at ``x == 0``, ``value_at_1`` at ``|x| == 1``."""
    if sigmoid == "gaussian":
        return torch.exp(-0.5 * (x * math.sqrt(-2 * math.log(value_at_1))) ** 2)
    if sigmoid == "hyperbolic":
        return 1 / torch.cosh(x * math.acosh(1 / value_at_1))
    if sigmoid == "long_tail":
        return 1 / ((x * math.sqrt(1 / value_at_1 - 1)) ** 2 + 1)
    if sigmoid == "reciprocal":
        return 1 / (x.abs() * (1 / value_at_1 - 1) + 1)
    if sigmoid == "cosine":
        scaled = x * (math.acos(2 * value_at_1 - 1) / math.pi)
        return torch.where(scaled.abs() < 1, (1 + torch.cos(math.pi * scaled)) / 2, 0.0)
    if sigmoid == "linear":
        scaled = x * (1 - value_at_1)
        return torch.where(scaled.abs() < 1, 1 - scaled, 0.0)
    if sigmoid == "quadratic":
        scaled = x * math.sqrt(1 - value_at_1)
        return torch.where(scaled.abs() < 1, 1 - scaled**2, 0.0)
    if sigmoid == "tanh_squared":
        return 1 - torch.tanh(x * math.atanh(math.sqrt(1 - value_at_1))) ** 2
    raise ValueError(f"unknown sigmoid {sigmoid!r}")


def tolerance(x: torch.Tensor, bounds: tuple[float, float] = (0.0, 0.0), margin: float = 0.0,
              sigmoid: str = "gaussian", value_at_margin: float = 0.1) -> torch.Tensor:
    """dm_control's ``rewards.tolerance`` on tensors: 1 inside ``bounds``, a sigmoid of the distance outside."""
    lower, upper = bounds
    in_bounds = (lower <= x) & (x <= upper)
    if margin == 0:
        return in_bounds.to(x.dtype)
    d = torch.where(x < lower, lower - x, x - upper) / margin
    return torch.where(in_bounds, 1.0, _sigmoid(d, value_at_margin, sigmoid))


def _linear(x: torch.Tensor, bounds: tuple[float, float], margin: float, value_at_margin: float = 0.0):
    return tolerance(x, bounds=bounds, margin=margin, sigmoid="linear", value_at_margin=value_at_margin)


def _small_control(ctrl: torch.Tensor) -> torch.Tensor:
    """``(4 + mean(tolerance(ctrl, margin=1, quadratic, value_at_margin=0))) / 5``: point mass and maze."""
    return (tolerance(ctrl, margin=1, value_at_margin=0, sigmoid="quadratic").mean(-1) + 4) / 5


# ------------------------------------------------------------------------------------- the task
Reward = Callable[[PhysicsBatch], torch.Tensor]


@dataclass
class BatchedTask:
    """A task's batched reward and its domain's batched observation.

    Attributes:
        name: the task name (``"walker-walk"``).
        reward: ``PhysicsBatch -> [N]``, dm_control's ``get_reward`` on every row.
        observe: ``PhysicsBatch -> [N, D]`` float32, dm_control's observation dict flattened in its order.
        state_layout: ``[(key, size), ...]``, the observation dict's keys and sizes in that order.
        needs_subtree_vel: whether ``subtree_linvel`` / ``subtree_angmom`` must be current (beyond
            what the model's sensors compute).
    """

    name: str
    reward: Reward
    observe: Callable[[PhysicsBatch], torch.Tensor]
    state_layout: list[tuple[str, int]]
    needs_subtree_vel: bool = False


def _id(model: mujoco.MjModel, obj: mujoco.mjtObj, name: str) -> int:
    i = mujoco.mj_name2id(model, obj, name)
    if i < 0:
        raise ValueError(f"the model has no {obj.name[6:].lower()} named {name!r}")
    return i


def _sensor_index(model: mujoco.MjModel, ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """``sensordata`` columns of the sensors ``ids``, concatenated in that order."""
    cols = [np.arange(model.sensor_adr[i], model.sensor_adr[i] + model.sensor_dim[i]) for i in ids]
    return torch.as_tensor(np.concatenate(cols) if cols else np.zeros(0), dtype=torch.long, device=device)


def _sensors_of_type(model: mujoco.MjModel, device: torch.device, *types: mujoco.mjtSensor) -> torch.Tensor:
    ids = [i for i in range(model.nsensor) if model.sensor_type[i] in [int(t) for t in types]]
    return _sensor_index(model, ids, device)


def _named_sensor(model: mujoco.MjModel, name: str, device: torch.device) -> torch.Tensor:
    return _sensor_index(model, [_id(model, mujoco.mjtObj.mjOBJ_SENSOR, name)], device)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    n = parts[0].shape[0]
    return torch.cat([p.reshape(n, -1) for p in parts], dim=-1).to(torch.float32)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(-1, index)


# --- walker --------------------------------------------------------------------------------------------
def _walker(task, model, device) -> tuple[Reward | None, Callable, bool]:
    torso = _id(model, mujoco.mjtObj.mjOBJ_BODY, "torso")
    subtreelinvel = _named_sensor(model, "torso_subtreelinvel", device)

    def observe(p):  # orientations (xx, xz of bodies 1..), height, velocity
        return _cat([p.xmat[:, 1:, 0][..., [0, 2]], p.xpos[:, torso, 2], p.qvel])

    def stand(p):
        standing = tolerance(p.xpos[:, torso, 2], bounds=(walker._STAND_HEIGHT, float("inf")),
                             margin=walker._STAND_HEIGHT / 2)
        upright = (1 + p.xmat[:, torso, 2, 2]) / 2
        return (3 * standing + upright) / 4

    def spin(p, momentum):
        return _linear(p.subtree_angmom[:, torso, 1], (momentum, float("inf")), margin=momentum)

    if isinstance(task, custom_tasks.WalkerSpin):
        return (lambda p: spin(p, task._momentum)), observe, True
    if isinstance(task, custom_tasks.WalkerFlip):
        return (lambda p: stand(p) * (5 * spin(p, task._momentum) + 1) / 6), observe, True
    if type(task) is walker.PlanarWalker:
        speed = task._move_speed
        if speed == 0:
            return stand, observe, False

        def move(p):
            move_reward = tolerance(_gather(p.sensordata, subtreelinvel)[:, 0], bounds=(speed, float("inf")),
                                    margin=speed / 2, value_at_margin=0.5, sigmoid="linear")
            return stand(p) * (5 * move_reward + 1) / 6

        return move, observe, False
    return None, observe, False


# --- cheetah -------------------------------------------------------------------------------------------
def _cheetah(task, model, device):
    subtreelinvel = _named_sensor(model, "torso_subtreelinvel", device)

    def observe(p):  # position (qpos without rootx), velocity
        return _cat([p.qpos[:, 1:], p.qvel])

    if isinstance(task, custom_tasks.CheetahMove):
        speed, direction = task._speed, task._direction
    elif type(task) is cheetah.Cheetah:
        speed, direction = cheetah._RUN_SPEED, 1.0
    else:
        return None, observe, False

    def reward(p):
        v = direction * _gather(p.sensordata, subtreelinvel)[:, 0]
        return _linear(v, (speed, float("inf")), margin=speed)

    return reward, observe, False


# --- quadruped -----------------------------------------------------------------------------------------
def _quadruped(task, model, device):
    torso = _id(model, mujoco.mjtObj.mjOBJ_BODY, "torso")
    hinges = np.nonzero(model.jnt_type == mujoco.mjtJoint.mjJNT_HINGE)[0]
    hinge_qpos = torch.as_tensor(model.jnt_qposadr[hinges], dtype=torch.long, device=device)
    hinge_qvel = torch.as_tensor(model.jnt_dofadr[hinges], dtype=torch.long, device=device)
    velocimeter = _named_sensor(model, "velocimeter", device)
    center_of_mass = _named_sensor(model, "center_of_mass", device)
    imu = _sensors_of_type(model, device, mujoco.mjtSensor.mjSENS_GYRO, mujoco.mjtSensor.mjSENS_ACCELEROMETER)
    force_torque = _sensors_of_type(model, device, mujoco.mjtSensor.mjSENS_FORCE, mujoco.mjtSensor.mjSENS_TORQUE)

    def observe(p):  # egocentric_state, torso_velocity, torso_upright, imu, force_torque
        ego = [_gather(p.qpos, hinge_qpos), _gather(p.qvel, hinge_qvel), p.act]
        return _cat([*ego, _gather(p.sensordata, velocimeter), p.xmat[:, torso, 2, 2],
                     _gather(p.sensordata, imu), torch.asinh(_gather(p.sensordata, force_torque))])

    def upright(p):  # quadruped._upright_reward with deviation_angle=0
        return _linear(p.xmat[:, torso, 2, 2], (1.0, float("inf")), margin=2.0)

    if isinstance(task, custom_tasks.QuadrupedStand):
        return upright, observe, False
    if isinstance(task, custom_tasks.QuadrupedJump):
        height = task._desired_height

        def jump(p):
            com_z = _gather(p.sensordata, center_of_mass)[:, 2]
            return upright(p) * _linear(com_z, (height, float("inf")), margin=height, value_at_margin=0.5)

        return jump, observe, False
    if type(task) is quadruped.Move:
        speed = task._desired_speed

        def move(p):
            v = _gather(p.sensordata, velocimeter)[:, 0]
            return upright(p) * tolerance(v, bounds=(speed, float("inf")), margin=speed, value_at_margin=0.5,
                                          sigmoid="linear")

        return move, observe, False
    return None, observe, False


# --- point_mass ----------------------------------------------------------------------------------------
def _point_mass(task, model, device):
    target = _id(model, mujoco.mjtObj.mjOBJ_GEOM, "target")
    mass = _id(model, mujoco.mjtObj.mjOBJ_GEOM, "pointmass")
    target_size = float(model.geom_size[target, 0])

    def observe(p):
        return _cat([p.qpos, p.qvel])

    if type(task) is not point_mass.PointMass or task._randomize_gains:
        return None, observe, False

    def reward(p):
        distance = torch.linalg.vector_norm(p.geom_xpos[:, target] - p.geom_xpos[:, mass], dim=-1)
        near_target = tolerance(distance, bounds=(0, target_size), margin=target_size)
        return near_target * _small_control(p.ctrl)

    return reward, observe, False


# --- point_mass_maze -----------------------------------------------------------------------------------
def _point_mass_maze(task, model, device):
    mass = _id(model, mujoco.mjtObj.mjOBJ_GEOM, "pointmass")
    targets = {c: torch.as_tensor(model.site_pos[_id(model, mujoco.mjtObj.mjOBJ_SITE, f"target_{c}"), :2],
                                  device=device) for c in custom_tasks._MAZE_CORNERS}

    def observe(p):
        return _cat([p.qpos, p.qvel])

    def reach(p, corner, margin):
        target = targets[corner].to(p.geom_xpos)
        distance = torch.linalg.vector_norm(target - p.geom_xpos[:, mass, :2], dim=-1)
        near_target = tolerance(distance, bounds=(0, custom_tasks._MAZE_TARGET_SIZE), margin=margin)
        return near_target * _small_control(p.ctrl)

    def corridors(x, y, edge):
        up, right, left, down = (y > edge), (x > edge), (x < -edge), (y < -edge)
        crossing = (up.long() + right.long() + left.long() + down.long()) > 1
        return up.to(x.dtype), right.to(x.dtype), left.to(x.dtype), down.to(x.dtype), crossing

    def reach_long(p):
        reward = reach(p, "bottom_left", custom_tasks._MAZE_REACH_MARGIN)
        x, y, vx, vy = p.qpos[:, 0], p.qpos[:, 1], p.qvel[:, 0], p.qvel[:, 1]
        up, right, left, down, crossing = corridors(x, y, 0.15)

        def along(v, sign):
            v = sign * v.clamp(-0.1, 0.1)
            return v * torch.where(v >= 0, 5.0, 100.0)

        corridor = up * along(vx, 1) + right * along(vy, -1) + left * along(vy, 1) + down * along(vx, -1)
        corridor = torch.where(crossing, 0.0, corridor)
        return torch.where(reward >= 0.01, reward, corridor)

    def loop(p):
        x, y, vx, vy = p.qpos[:, 0], p.qpos[:, 1], p.qvel[:, 0], p.qvel[:, 1]
        sx = torch.where(y >= 0, 1.0, -1.0).to(x.dtype)
        sy = torch.where(x <= 0, 1.0, -1.0).to(x.dtype)
        distance = (x.abs() + y.abs() - 0.24).abs() / math.sqrt(2)
        on_line = _linear(distance, (0, 0.02), margin=0.02)
        return (on_line + _linear(sx * vx, (0.06, 0.1), margin=0.01) + _linear(sy * vy, (0.06, 0.1), margin=0.01)) / 3

    def square(p):
        x, y, vx, vy = p.qpos[:, 0], p.qpos[:, 1], p.qvel[:, 0], p.qvel[:, 1]
        up, right, left, down, crossing = corridors(x, y, 0.2)
        clockwise = up * vx - right * vy + left * vy - down * vx
        return torch.where(crossing, 0.0, clockwise.clamp(0, 0.1) * 10)

    def fast_slow(p):
        x, y, vx, vy = p.qpos[:, 0], p.qpos[:, 1], p.qvel[:, 0], p.qvel[:, 1]
        up, right, left, down = (((0.2 < c) & (c < 0.28)).to(x.dtype) for c in (y, x, -x, -y))
        crossing = (up + right + left + down) > 1
        reward = (up * _linear(vx, (-0.05, -0.04), margin=0.01) + right * _linear(vy, (0.09, 0.1), margin=0.01)
                  + left * _linear(vy, (-0.1, -0.09), margin=0.01) + down * _linear(vx, (0.04, 0.05), margin=0.01))
        return torch.where(crossing, 0.0, reward)

    if isinstance(task, custom_tasks.PointMassMazeReach):
        return (lambda p: reach(p, task._corner, task._margin)), observe, False
    rewards = {custom_tasks.PointMassMazeReachLong: reach_long, custom_tasks.PointMassMazeLoop: loop,
               custom_tasks.PointMassMazeSquare: square, custom_tasks.PointMassMazeFastSlow: fast_slow}
    return rewards.get(type(task)), observe, False


# --- reacher -------------------------------------------------------------------------------------------
def _reacher(task, model, device):
    target = _id(model, mujoco.mjtObj.mjOBJ_GEOM, "target")
    finger = _id(model, mujoco.mjtObj.mjOBJ_GEOM, "finger")

    def to_target(p):
        return p.geom_xpos[:, target, :2] - p.geom_xpos[:, finger, :2]

    def observe(p):  # position, to_target, velocity
        return _cat([p.qpos, to_target(p), p.qvel])

    if type(task) is not reacher.Reacher:
        return None, observe, False
    radii = float(task._target_size + model.geom_size[finger, 0])

    def reward(p):
        return tolerance(torch.linalg.vector_norm(to_target(p), dim=-1), (0, radii))

    return reward, observe, False


# --- cartpole ------------------------------------------------------------------------------------------
def _cartpole(task, model, device):
    slider = int(model.jnt_qposadr[_id(model, mujoco.mjtObj.mjOBJ_JOINT, "slider")])

    def observe(p):  # position (cart, then zz and xz of each pole), velocity
        poles = p.xmat[:, 2:]
        return _cat([p.qpos[:, slider], torch.stack([poles[..., 2, 2], poles[..., 0, 2]], dim=-1), p.qvel])

    if not isinstance(task, cartpole.Balance):
        return None, observe, False

    def reward(p):
        cart = p.qpos[:, slider]
        cosine = p.xmat[:, 2:, 2, 2]
        if task._sparse:
            cart_in_bounds = tolerance(cart, task._CART_RANGE)
            return cart_in_bounds * tolerance(cosine, task._ANGLE_COSINE_RANGE).prod(-1)
        upright = (cosine + 1) / 2
        centered = (1 + tolerance(cart, margin=2)) / 2
        small_control = (4 + tolerance(p.ctrl, margin=1, value_at_margin=0, sigmoid="quadratic")[:, 0]) / 5
        small_velocity = (1 + tolerance(p.qvel[:, 1:], margin=5).amin(-1)) / 2
        return upright.mean(-1) * small_control * small_velocity * centered

    return reward, observe, False


_DOMAINS = {"walker": _walker, "cheetah": _cheetah, "quadruped": _quadruped, "point_mass": _point_mass,
            "point_mass_maze": _point_mass_maze, "reacher": _reacher, "cartpole": _cartpole}


def make_batched_task(name: str, env: control.Environment, device: str | torch.device = "cpu") -> BatchedTask:
    """The batched reward and observation of task ``name``, given a dm_control env of it that has been reset.

    ``device``: where the inputs (:class:`PhysicsBatch`) will live; index tensors are put there once.

    Raises ``ValueError`` naming the supported tasks if ``name`` has no batched version.
    """
    domain = name.split("-", 1)[0]
    if name in _UNSUPPORTED or domain not in _DOMAINS:
        why = _UNSUPPORTED.get(name, f"domain {domain!r} has no batched task functions yet")
        raise ValueError(f"task {name!r} is not supported by the batched (mjwarp) backend: {why}. "
                         f"Supported: {', '.join(supported_tasks())}; use backend='dmc' for the others.")
    model = env.physics.model.ptr
    reward, observe, needs_subtree_vel = _DOMAINS[domain](env.task, model, torch.device(device))
    if reward is None:
        raise ValueError(f"task {name!r} ({type(env.task).__name__}) has no batched reward; "
                         f"supported: {', '.join(supported_tasks())}")
    observation = env.task.get_observation(env.physics)
    layout = [(k, int(np.prod(np.shape(v)))) for k, v in observation.items()]
    return BatchedTask(name, reward, observe, layout, needs_subtree_vel)
