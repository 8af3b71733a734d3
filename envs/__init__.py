"""Simulated robots with pixels: ``make_env``, tasks as reward functions of physics (and where the
body is: ``body_position``), gymnasium ids."""

from __future__ import annotations

import torch
from torchrl.envs import EnvBase

from latentrl.envs.backend import check_env_args, check_int
from latentrl.envs.tasks import Task, body_position, get_task, list_domain_tasks, list_tasks

__all__ = ["make_env", "get_task", "list_tasks", "list_domain_tasks", "Task", "body_position", "BACKENDS"]

BACKENDS = ("dmc", "mjwarp")


def make_env(task: str, *, obs=("pixels", "state"), image_size: int = 64, camera: int | None = None,
             action_repeat: int = 1, num_envs: int = 1, backend: str = "dmc", device: str | torch.device = "cpu",
             seed: int = 0, floor: str = "default", episode_length: int | None = None,
             num_workers: int | None = None) -> EnvBase:
    """A batch of ``num_envs`` envs of ``task`` (``"walker-walk"``) as a TorchRL env, ``batch_size=[num_envs]``.

    Args:
        task: ``"<domain>-<task>"``; :func:`list_tasks` names them all.
        obs: which of ``"pixels"`` (uint8 [N, 3, H, W], newest frame only), ``"state"`` (float32
            [N, D]) and ``"physics"`` (float64 [N, P], the full MuJoCo state) to return.
        image_size: square frame size in pixels: an even int from 2 to
            :data:`latentrl.envs.backend.MAX_IMAGE_SIZE` (1024); even because evaluation videos are
            H.264, which needs even frame sizes.
        camera: camera id; ``None`` picks the domain's default (quadruped: 2, others: 0).
        action_repeat: physics control steps per agent step (rewards are summed).
        num_envs: envs in the batch.
        backend: ``"dmc"`` (dm_control on the CPU, envs in worker processes) or ``"mjwarp"``
            (MuJoCo Warp, all envs in one batch; GPU or CPU).
        device: where returned tensors live.
        seed: seeds every env (env i gets an independent stream derived from ``seed``); an int >= 0.
        floor: ``"default"`` or ``"gradient"``: METRA's coloured scenes, where position shows in
            pixels (colours over 30 m centred on the start; the cheetah's ground centred on the start
            and its side camera looking down at it; :func:`latentrl.envs.dmc.apply_gradient_floor`).
        episode_length: agent steps per episode (>= 1); ``None`` keeps the task's own (1000 control
            steps divided by ``action_repeat`` for most tasks).
        num_workers: worker processes for the ``dmc`` backend; ``None``: none for one env, else
            ``min(num_envs, cpu_count)``; 0 steps everything in this process.

    Bad arguments raise a ``ValueError`` that names the value, the valid range and the fix, before
    anything is built. ``env.step`` refuses actions of the wrong shape and non-finite actions, clips the
    others to [-1, 1] and writes the executed (clipped) action back into the step's ``"action"`` entry,
    so whatever stores the step stores what ran. A closed env refuses to step.
    """
    if not isinstance(task, str):
        raise ValueError(f"task must be a task name such as 'walker-walk', got {task!r}; "
                         "latentrl.envs.list_tasks() names all of them")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)} (dmc: dm_control "
                         "on the CPU; mjwarp: MuJoCo Warp, batched on the GPU)")
    obs = check_env_args(obs, floor, action_repeat, num_envs, image_size, episode_length, seed)
    get_task(task)  # an unknown name lists the closest valid ones
    if camera is not None:
        check_int("camera", camera, low=-1, fix="camera is a camera id of the task's model (-1: the free camera), "
                  "or None for the domain's default")
    if num_workers is not None:
        check_int("num_workers", num_workers, low=0, fix="num_workers=0 steps every env in this process; None "
                  "picks min(num_envs, cpu_count)")
    device = check_device(device)
    if backend == "dmc":
        from latentrl.envs.dmc import DMCEnv

        return DMCEnv(task, obs=obs, image_size=image_size, camera=camera, action_repeat=action_repeat,
                      num_envs=num_envs, num_workers=num_workers, seed=seed, floor=floor,
                      episode_length=episode_length, device=device)
    if backend == "mjwarp":
        try:
            from latentrl.envs.mjwarp import MJWarpEnv
        except ModuleNotFoundError as err:
            if err.name in ("mujoco_warp", "warp"):
                raise ModuleNotFoundError(
                    "backend='mjwarp' needs MuJoCo Warp: pip install \"latentrl[gpu]\"") from err
            raise NotImplementedError("backend='mjwarp' is not built yet (see the GPU-batched envs issue)") from err
        return MJWarpEnv(task, obs=obs, image_size=image_size, camera=camera, action_repeat=action_repeat,
                         num_envs=num_envs, seed=seed, floor=floor, episode_length=episode_length, device=device)
    raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device``; an unknown name or CUDA without a GPU is an error saying what to use."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: use 'cpu' or 'cuda' ('cuda:1' for a second GPU)"
                         ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but this torch sees no CUDA GPU; use device='cpu'")
    return device


def _register_gymnasium() -> None:
    from latentrl.envs.gym import register_envs

    register_envs()


_register_gymnasium()
