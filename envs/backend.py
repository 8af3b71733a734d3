"""What every env backend shares (dm_control on the CPU, MuJoCo Warp batched): the ``make_env``
argument checks, per-env seeds, the TorchRL specs of a latentrl env, and METRA's coloured floor.

Backends import from here; neither imports the other.
"""

from __future__ import annotations

import math

import mujoco
import numpy as np
import torch
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

__all__ = ["GRADIENT_SPAN", "OBS_KEYS", "apply_gradient_floor", "check_env_args", "env_seeds",
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


def check_env_args(obs, floor: str, action_repeat: int, num_envs: int, image_size: int) -> tuple[str, ...]:
    """Validate the ``make_env`` arguments every backend shares; returns ``obs`` as a tuple."""
    obs = tuple(obs)
    unknown = [k for k in obs if k not in OBS_KEYS]
    if unknown or not obs:
        raise ValueError(f"obs must be a non-empty subset of {OBS_KEYS}, got {obs}")
    if floor not in ("default", "gradient"):
        raise ValueError(f"floor must be 'default' or 'gradient', got {floor!r}")
    if action_repeat < 1 or num_envs < 1 or image_size < 1:
        raise ValueError("action_repeat, num_envs and image_size must be >= 1")
    return obs


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
