"""What every env backend shares (dm_control on the CPU, MuJoCo Warp batched): the ``make_env``
argument checks, per-env seeds, the TorchRL specs of a latentrl env, and METRA's coloured floor.

Backends import from here; neither imports the other.
"""

from __future__ import annotations

import difflib
import math

import mujoco
import numpy as np
import torch
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

__all__ = ["FLOORS", "GRADIENT_SPAN", "MAX_IMAGE_SIZE", "OBS_KEYS", "apply_gradient_floor", "check_action",
           "check_env_args", "check_int", "check_obs", "check_physics_states", "closed_env_error", "env_seeds",
           "gradient_floor_colour", "set_env_specs"]

OBS_KEYS = ("pixels", "state", "physics")


def set_env_specs(env: EnvBase, obs, n: int, size: int, action_dim: int, state_dim: int, physics_dim: int) -> None:
    """The specs every latentrl env shares (dmc and mjwarp backends): see :class:`DMCEnv` for the keys."""
    dev = env.device
    spec = Composite(shape=(n,))
    if "pixels" in obs:
        spec["pixels"] = Bounded(0, 255, shape=(n, 3, size, size), dtype=torch.uint8, device=dev)
    if "state" in obs:
        spec["state"] = Unbounded(shape=(n, state_dim), dtype=torch.float32, device=dev)
    if "physics" in obs:
        spec["physics"] = Unbounded(shape=(n, physics_dim), dtype=torch.float64, device=dev)
    spec["episode"] = Unbounded(shape=(n,), dtype=torch.int64, device=dev)
    spec["step"] = Unbounded(shape=(n,), dtype=torch.int64, device=dev)
    env.observation_spec = spec
    env.action_spec = Bounded(-1.0, 1.0, shape=(n, action_dim), dtype=torch.float32, device=dev)
    env.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32, device=dev)
    flag = Categorical(2, shape=(n, 1), dtype=torch.bool, device=dev)
    env.done_spec = Composite(done=flag, terminated=flag.clone(), truncated=flag.clone(), shape=(n,))


# The largest ``image_size`` accepted: a 1024 x 1024 RGB frame is 3 MiB, stored once per env step by the
# replay buffer and rendered per env per step; far past any pixel-based agent's input (64 or 84), and
# well below where offscreen buffers fail or a [num_envs, 3, H, W] batch exhausts memory (100000 asked
# for 30 GB per env).
MAX_IMAGE_SIZE = 1024
FLOORS = ("default", "gradient")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, *, low: int, high: int | None = None, fix: str = "") -> int:
    """``value`` as an int in ``[low, high]``; otherwise a ``ValueError`` naming the value, the range and ``fix``."""
    span = f">= {low}" if high is None else f"in [{low}, {high}]"
    if not _is_int(value) or value < low or (high is not None and value > high):
        kind = "" if _is_int(value) else f" ({type(value).__name__})"
        raise ValueError(f"{name} must be an int {span}, got {value!r}{kind}" + (f"; {fix}" if fix else ""))
    return int(value)


def _suggest(value, valid) -> str:
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_obs(obs) -> tuple[str, ...]:
    """``obs`` as a tuple of keys from :data:`OBS_KEYS` (a single key may be given as a str; repeats are dropped)."""
    if isinstance(obs, str):
        obs = (obs,)
    try:
        obs = tuple(dict.fromkeys(obs))
    except TypeError:
        raise ValueError(f"obs must be a sequence of keys from {OBS_KEYS}, got {obs!r}") from None
    unknown = [k for k in obs if k not in OBS_KEYS]
    if unknown or not obs:
        what = f"unknown obs keys {unknown}{_suggest(unknown[0], OBS_KEYS)}" if unknown else "obs is empty"
        raise ValueError(f"{what}: obs must name one or more of {OBS_KEYS}, e.g. obs=('pixels', 'state')")
    return obs


def check_env_args(obs, floor: str, action_repeat: int, num_envs: int, image_size: int,
                   episode_length: int | None = None, seed: int = 0) -> tuple[str, ...]:
    """Validate the ``make_env`` arguments every backend (and the gymnasium ids) share; returns ``obs`` as a tuple.

    ``image_size`` is an even int in ``[2, MAX_IMAGE_SIZE]`` whatever ``obs`` holds: evaluation videos are
    H.264 (yuv420p), which needs even frame sizes (an odd size wrote an empty mp4).
    """
    obs = check_obs(obs)
    if not isinstance(floor, str) or floor not in FLOORS:
        raise ValueError(f"unknown floor {floor!r}{_suggest(floor, FLOORS)}; floor must be one of {FLOORS} "
                         "('gradient': METRA's coloured floor, where position shows in pixels)")
    check_int("image_size", image_size, low=2, high=MAX_IMAGE_SIZE,
              fix=f"frames are square, image_size x image_size pixels (64 or 84 for pixel agents); {MAX_IMAGE_SIZE} "
                  "is the largest supported (a 3 MiB frame per env and step)")
    if image_size % 2:
        raise ValueError(f"image_size must be even, got {image_size}: evaluation videos are H.264 (yuv420p), which "
                         f"needs even frame sizes; use {image_size - 1} or {image_size + 1}")
    check_int("num_envs", num_envs, low=1, fix="num_envs is the number of envs stepped as one batch")
    check_int("action_repeat", action_repeat, low=1, fix="action_repeat is the number of physics control steps per "
              "agent step (1: no repeat)")
    if episode_length is not None:
        check_int("episode_length", episode_length, low=1,
                  fix="episode_length counts agent steps per episode; None keeps the task's own length")
    check_int("seed", seed, low=0, high=2**63 - 1, fix="seeds are non-negative ints")
    return obs


def check_action(action, shape: tuple[int, ...], spec: str = "env.action_spec.shape", *,
                 finite: bool = True) -> torch.Tensor:
    """The action to execute: float32 ``shape``, clipped to [-1, 1], on ``action``'s device.

    Raises on a wrong shape (naming the expected one) and on non-finite values (NaN, inf), naming the
    rows and the values: they must never reach the physics (dm_control raises ``PhysicsError`` on them,
    MuJoCo Warp's worlds diverge). Values outside [-1, 1] are clipped, as the physics would.
    ``finite=False`` skips the finiteness check (a host read): the caller handles non-finite rows itself.
    """
    action = torch.as_tensor(action)
    if tuple(action.shape) != tuple(shape):
        layout = "[num_envs, A]" if len(shape) == 2 else "[A]"
        raise ValueError(
            f"action has shape {list(action.shape)}, but this env takes {layout} = {list(shape)} "
            f"({spec}): one row of {shape[-1]} values in [-1, 1]"
            + (" per env" if len(shape) == 2 else "")
        )
    if action.is_complex() or action.dtype == torch.bool:
        raise ValueError(f"action must be real-valued (float32), got dtype {action.dtype}")
    action = action.detach().to(torch.float32)
    if not finite:
        return action.clamp(-1.0, 1.0)
    finite = torch.isfinite(action)
    if not bool(finite.all()):
        rows = finite.reshape(-1, shape[-1]).all(-1).logical_not().nonzero().flatten().tolist()
        flat = action.reshape(-1, shape[-1])
        examples = ", ".join(f"row {r}: {flat[r].tolist()}" for r in rows[:3])
        where = f" in env rows {rows[:10]}" if len(shape) == 2 else ""
        raise ValueError(
            f"action holds non-finite values (NaN or inf){where} ({examples}); they would break the physics "
            "(dm_control raises PhysicsError). A NaN action usually means the policy's parameters or inputs "
            "went non-finite: fix the policy, or replace those values before env.step()"
        )
    return action.clamp(-1.0, 1.0)


def check_physics_states(states, num_envs: int, size: int) -> torch.Tensor:
    """Physics states as float64 ``[num_envs, size]`` (on their device); a wrong shape or a non-finite value
    is an error."""
    states = torch.as_tensor(states).to(torch.float64)
    if tuple(states.shape) != (num_envs, size):
        raise ValueError(f"expected physics states of shape [num_envs, P] = [{num_envs}, {size}], got "
                         f"{list(states.shape)}; the 'physics' key of this env's observations has that shape")
    bad = ~torch.isfinite(states).all(-1)
    if bool(bad.any()):
        raise ValueError(f"physics states of env rows {bad.nonzero().flatten().tolist()} hold non-finite values "
                         "(NaN or inf); MuJoCo cannot simulate them")
    return states


def closed_env_error(task: str, remake: str | None = None) -> RuntimeError:
    """The error of a closed env asked to step, reset or seed (its workers and renderers are gone)."""
    remake = remake or f"make_env({task!r}, ...)"
    return RuntimeError(f"this {task!r} env is closed (env.close() was called); make a new one with {remake}")


def env_seeds(seed: int, num_envs: int) -> list[int]:
    """Independent seeds for envs 0..num_envs-1 derived from ``seed`` (the same in every backend)."""
    return [int(c.generate_state(1)[0]) for c in np.random.SeedSequence(seed).spawn(num_envs)]


# METRA's coloured scenes (``envs/custom_dmc_tasks/*_color.xml`` and ``pixel_wrappers.RenderWrapper`` in
# seohongpark/METRA): the colours span a 30 m stretch of floor centred on the start and hold their end
# colours beyond it. The cheetah's side camera is METRA's too: 1 m higher and tilted 30 degrees down at
# the floor (the suite's looks level, so the floor strip fills 9 of 64 rows; METRA's fills about 23).
GRADIENT_SPAN = 30.0
_CHEETAH_GROUND_HALF_LENGTH = 60.0
_CHEETAH_SIDE_CAMERA = {"pos": (0.0, -2.5, 1.0), "quat": (math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0, 0.0)}


def _rainbow(s: np.ndarray) -> np.ndarray:
    """matplotlib's ``rainbow`` colour map (gnuplot formulae 33, 13, 10) at ``s`` in [0, 1], as RGB in [0, 1]."""
    s = np.clip(s, 0.0, 1.0)
    return np.clip(np.stack([np.abs(2 * s - 0.5), np.sin(np.pi * s), np.cos(np.pi * s / 2)], axis=-1), 0.0, 1.0)


def gradient_floor_colour(domain: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] of the ``floor="gradient"`` floor at world points ``(x, y)`` (METRA's colours).

    Cheetah: the ``rainbow`` map along x, from purple at x = -15 m to red at +15 m. Other domains:
    red ramps from 0 at y = +15 m to 1 at y = -15 m, green from 0 at x = -15 m to 1 at x = +15 m,
    blue is 0.5 (METRA's quadruped/humanoid floor, ``[row / h, col / w, 0.5]``).
    """
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    if domain == "cheetah":
        return _rainbow(x / GRADIENT_SPAN + 0.5)
    red = np.clip(0.5 - y / GRADIENT_SPAN, 0.0, 1.0)
    green = np.clip(0.5 + x / GRADIENT_SPAN, 0.0, 1.0)
    return np.stack([red, green, np.full_like(red, 0.5)], axis=-1)


def apply_gradient_floor(model: mujoco.MjModel, domain: str) -> None:
    """Recolour the floor so that position is visible from pixels: METRA's ``*_color`` scenes.

    The floor's texture is stretched once over the floor plane (MuJoCo maps texel column u to
    x = pos + (2u - 1) * size_x and row v to y = pos - (2v - 1) * size_y) and painted with
    :func:`gradient_floor_colour`. For the cheetah, as in METRA's ``cheetah_color.xml``, the ground
    strip is centred on the start (the suite's begins 2 m behind it; planes collide everywhere, so
    only the picture changes) and the ``side`` camera looks down at it.
    """
    names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_GEOM, i) for i in range(model.ngeom)]
    planes = [i for i in range(model.ngeom) if model.geom_type[i] == mujoco.mjtGeom.mjGEOM_PLANE]
    named = [i for i in planes if names[i] in ("floor", "ground")]
    if not (named or planes):
        raise ValueError("floor='gradient' needs a floor: a plane geom (named 'floor' or 'ground')")
    floor = (named or planes)[0]
    mat = model.geom_matid[floor]
    if mat < 0:
        raise ValueError("floor='gradient' needs the floor geom to have a material")
    tex = model.mat_texid[mat, mujoco.mjtTextureRole.mjTEXROLE_RGB]
    if tex < 0:
        raise ValueError("floor='gradient' needs the floor material to have a texture")
    if domain == "cheetah":
        model.geom_pos[floor, 0] = 0.0
        model.geom_size[floor, 0] = _CHEETAH_GROUND_HALF_LENGTH
        side = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "side")
        if side >= 0:
            model.cam_pos[side] = _CHEETAH_SIDE_CAMERA["pos"]
            model.cam_quat[side] = _CHEETAH_SIDE_CAMERA["quat"]
            # A tracking camera follows the offsets computed at compile time; recompute them.
            mujoco.mj_setConst(model, mujoco.MjData(model))
    w, h, c = model.tex_width[tex], model.tex_height[tex], model.tex_nchannel[tex]
    (cx, cy, _), (sx, sy, _) = model.geom_pos[floor], model.geom_size[floor]
    x = cx + (2 * (np.arange(w) + 0.5) / w - 1) * sx
    y = cy - (2 * (np.arange(h) + 0.5) / h - 1) * sy
    rgb = gradient_floor_colour(domain, x[None, :], y[:, None])
    data = np.concatenate([rgb, np.ones((h, w, max(c - 3, 0)))], axis=-1)[..., :c]
    start = model.tex_adr[tex]
    model.tex_data[start : start + w * h * c] = np.round(data * 255).astype(np.uint8).reshape(-1)
    model.mat_texuniform[mat] = 0
    model.mat_texrepeat[mat] = 1.0
    model.mat_rgba[mat] = 1.0
    model.mat_reflectance[mat] = 0.0
