"""make_env (dmc backend): specs, seeding, resets, action repeat, episode length, cameras, floors, gymnasium."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torchrl.envs.utils import check_env_specs

from latentrl.envs import get_task, list_tasks, make_env


def _rollout(env, steps: int, seed: int = 0) -> list:
    torch.manual_seed(seed)
    actions = [env.action_spec.rand() for _ in range(steps)]
    td = env.reset()
    out = [td.clone()]
    for a in actions:
        td["action"] = a
        td = env.step(td)["next"]
        out.append(td.clone())
    return out


@pytest.mark.parametrize("task", ["walker-walk", "cheetah-run_backward", "point_mass_maze-reach_top_left",
                                  "quadruped-jump"])
@pytest.mark.parametrize("num_envs", [1, 2])
def test_check_env_specs(task, num_envs):
    """TorchRL's spec check in-process (1 env) and through a worker process (2 envs)."""
    env = make_env(task, obs=("pixels", "state", "physics"), num_envs=num_envs, num_workers=num_envs - 1)
    try:
        check_env_specs(env)
        td = env.reset()
        assert td["pixels"].shape == (num_envs, 3, 64, 64) and td["pixels"].dtype == torch.uint8
        assert td["physics"].dtype == torch.float64 and td["state"].dtype == torch.float32
        assert td["episode"].shape == (num_envs,)
        # episode ids are unique across envs: env i's n-th episode is n * num_envs + i
        assert (td["episode"] % num_envs).tolist() == list(range(num_envs))
    finally:
        env.close()


def test_same_seed_same_trajectory_and_other_seed_differs():
    runs = []
    for seed in (3, 3, 4):
        env = make_env("walker-walk", obs=("pixels", "physics"), num_envs=2, seed=seed, num_workers=0)
        runs.append(_rollout(env, 10))
        env.close()
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a["physics"], b["physics"]) and torch.equal(a["pixels"], b["pixels"])
    assert not torch.equal(runs[0][0]["physics"], runs[2][0]["physics"])
    # the two envs of one batch start from different states
    assert not torch.equal(runs[0][0]["physics"][0], runs[0][0]["physics"][1])


def test_workers_match_in_process():
    a = make_env("cheetah-run", obs=("state", "physics"), num_envs=2, seed=1, num_workers=0)
    b = make_env("cheetah-run", obs=("state", "physics"), num_envs=2, seed=1, num_workers=2)
    try:
        for x, y in zip(_rollout(a, 5), _rollout(b, 5), strict=True):
            assert torch.equal(x["physics"], y["physics"])
            assert torch.equal(x["state"], y["state"])
    finally:
        a.close()
        b.close()


def test_partial_reset_only_resets_masked_envs():
    env = make_env("walker-walk", obs=("physics",), num_envs=2, num_workers=0)
    td = env.reset()
    for _ in range(3):
        td["action"] = env.action_spec.rand()
        td = env.step(td)["next"]
    before = td["physics"].clone()
    td["_reset"] = torch.tensor([[True], [False]])
    out = env.reset(td)
    assert out["step"].tolist() == [0, 3]
    assert torch.equal(out["physics"][1], before[1])
    assert not torch.equal(out["physics"][0], before[0])
    assert out["episode"][0] == 2  # env 0's second episode: 1 * num_envs + 0
    env.close()


def test_action_repeat_and_episode_length():
    env1 = make_env("cheetah-run", obs=("physics",), action_repeat=1, seed=0, num_workers=0)
    env2 = make_env("cheetah-run", obs=("physics",), action_repeat=2, seed=0, episode_length=5, num_workers=0)
    assert env1.episode_length == 1000 and env2.episode_length == 5
    a = torch.full((1, 6), 0.3)
    t1, t2 = env1.reset(), env2.reset()
    rewards = []
    for _ in range(4):
        t1["action"] = a
        t1 = env1.step(t1)["next"]
        rewards.append(t1["reward"].item())
    for i in range(5):
        t2["action"] = a
        out = env2.step(t2)
        t2 = out["next"]
        if i == 1:  # two agent steps of two physics steps each == four single steps
            assert torch.equal(t2["physics"], t1["physics"])
            assert t2["reward"].item() == pytest.approx(sum(rewards[2:4]), rel=1e-6)
        assert t2["truncated"].item() == (i == 4) and not t2["terminated"].item()
    assert t2["done"].item()
    env1.close()
    env2.close()


def test_action_repeat_sums_rewards():
    env1 = make_env("cheetah-run", obs=("physics",), action_repeat=1, seed=0, num_workers=0)
    env3 = make_env("cheetah-run", obs=("physics",), action_repeat=3, seed=0, num_workers=0)
    a = torch.full((1, 6), -0.5)
    t1, t3 = env1.reset(), env3.reset()
    total = 0.0
    for _ in range(3):
        t1["action"] = a
        t1 = env1.step(t1)["next"]
        total += t1["reward"].item()
    t3["action"] = a
    t3 = env3.step(t3)["next"]
    assert torch.equal(t3["physics"], t1["physics"])
    assert t3["reward"].item() == pytest.approx(total, rel=1e-6)
    env1.close()
    env3.close()


def test_default_camera_and_explicit_camera():
    assert get_task("quadruped-walk").default_camera == 2
    assert get_task("walker-walk").default_camera == 0
    a = make_env("quadruped-walk", obs=("pixels",), seed=0, num_workers=0)
    b = make_env("quadruped-walk", obs=("pixels",), seed=0, camera=0, num_workers=0)
    assert not torch.equal(a.reset()["pixels"], b.reset()["pixels"])
    a.close()
    b.close()


def test_gradient_floor_changes_pixels_with_position():
    def frame_change(floor: str, metres: float) -> torch.Tensor:
        env = make_env("cheetah-run", obs=("pixels", "physics"), seed=0, floor=floor, num_workers=0)
        state = env.reset()["physics"].clone()
        frame0 = env.set_physics_state(state)["pixels"].float()
        state[0, 0] += metres  # qpos[0] is cheetah's rootx; the camera follows the body
        frame1 = env.set_physics_state(state)["pixels"].float()
        env.close()
        return (frame0 - frame1).abs()

    def largest_row_change(change: torch.Tensor) -> float:
        return change.mean(dim=(0, 1, 3)).max().item()

    # The tracking camera sees the same scene 10 m further on the default floor; the gradient floor
    # shows a different colour there.
    assert largest_row_change(frame_change("default", 10.0)) < 2.0
    assert largest_row_change(frame_change("gradient", 10.0)) > 5.0
    # On METRA's floor one metre of travel changes the frame by more than a step of random flailing
    # does (about 1.3).
    assert frame_change("gradient", 1.0).mean().item() > 2.0


def test_gradient_floor_is_metras_rainbow_for_cheetah():
    from latentrl.envs.backend import gradient_floor_colour

    torch.testing.assert_close(torch.as_tensor(gradient_floor_colour("cheetah", -15.0, 0.0)),
                               torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))  # purple behind
    assert gradient_floor_colour("cheetah", 15.0, 0.0)[0] == 1.0  # red ahead
    torch.testing.assert_close(torch.as_tensor(gradient_floor_colour("quadruped", [15.0, -15.0], [-15.0, 15.0])),
                               torch.tensor([[1.0, 1.0, 0.5], [0.0, 0.0, 0.5]], dtype=torch.float64))
    env = make_env("cheetah-run", obs=("pixels", "physics"), seed=0, floor="gradient", num_workers=0)
    state = env.reset()["physics"].clone()
    floor_rgb = {}
    for x in (-10.0, 10.0):  # the suite's ground begins 2 m behind the start; METRA's is centred on it
        state[0, 0] = x
        floor_rgb[x] = env.set_physics_state(state)["pixels"][0, :, 44:50].float().mean(dim=(1, 2))
    env.close()
    assert floor_rgb[-10.0][2] > floor_rgb[-10.0][0] + 50  # blue behind the start
    assert floor_rgb[10.0][0] > floor_rgb[10.0][2] + 50  # red ahead


def test_gradient_floor_leaves_the_dynamics_alone():
    # The cheetah's ground is moved and its camera re-aimed (METRA's scene): planes collide everywhere
    # and cameras have no mass, so the physics must be the default floor's bit for bit.
    envs = [make_env("cheetah-run", obs=("physics",), seed=3, floor=f, num_workers=0) for f in ("default", "gradient")]
    tds = [env.reset() for env in envs]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        action = torch.rand(1, 6, generator=generator) * 2 - 1
        for i, env in enumerate(envs):
            tds[i]["action"] = action
            tds[i] = env.step(tds[i])["next"]
    assert torch.equal(tds[0]["physics"], tds[1]["physics"])
    for env in envs:
        env.close()


def test_set_physics_state_renders_the_pose():
    env = make_env("walker-walk", obs=("pixels", "physics"), seed=0, num_workers=0)
    td = env.reset()
    state = td["physics"].clone()
    state[0, 0] += 0.5  # raise the torso (qpos[0] is walker's rootz)
    out = env.set_physics_state(state)
    assert torch.equal(out["physics"], state)
    assert not torch.equal(out["pixels"], td["pixels"])
    env.close()


def test_unknown_task_names_close_valid_ones():
    with pytest.raises(ValueError, match="walker-walk"):
        make_env("walker-wlak")
    with pytest.raises(ValueError, match="cheetah-run_backward"):
        get_task("cheetah-run-backward")
    with pytest.raises(ValueError, match="backend"):
        make_env("walker-walk", backend="jax")
    with pytest.raises(ValueError, match="obs"):
        make_env("walker-walk", obs=("rgb",))


def test_task_list_covers_suite_and_protocol():
    from dm_control import suite

    names = set(list_tasks())
    assert {f"{d}-{t}" for d, t in suite.ALL_TASKS} <= names
    protocol = ["walker-stand", "walker-walk", "walker-run", "walker-spin", "cheetah-walk", "cheetah-run",
                "cheetah-walk_backward", "cheetah-run_backward", "quadruped-stand", "quadruped-walk",
                "quadruped-run", "quadruped-jump"]
    protocol += [f"point_mass_maze-{t}" for t in ("reach_top_left", "reach_top_right", "reach_bottom_left",
                                                  "reach_bottom_right", "reach_bottom_left_long", "loop",
                                                  "square", "fast_slow")]
    assert set(protocol) <= names


def test_env_reward_equals_task_reward_of_next_physics():
    env = make_env("walker-walk", obs=("physics",), seed=2, num_envs=2, num_workers=0)
    task = get_task("walker-walk")
    td = env.reset()
    for _ in range(5):
        td["action"] = env.action_spec.rand()
        out = env.step(td)
        relabelled = task.rewards_from_states(out["next", "physics"].numpy(), out["action"].numpy())
        np.testing.assert_allclose(relabelled, out["next", "reward"].reshape(-1).numpy(), atol=1e-6)
        td = out["next"]
    env.close()


@pytest.mark.parametrize("obs_type", ["pixels", "state", "pixels_state"])
def test_gymnasium_env_checker(obs_type):
    env = gymnasium.make("latentrl/walker-walk-v0", obs_type=obs_type)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert info["physics"].dtype == np.float64
    env.close()


def test_missing_opengl_gives_an_error_that_says_what_to_install(monkeypatch):
    import mujoco

    class BrokenEGL(Exception):
        def __str__(self):  # PyOpenGL's EGLError can fail to print itself, as it did on a GPU host
            raise TypeError("cannot print")

    def no_gl(*args, **kwargs):
        raise BrokenEGL()

    monkeypatch.setattr(mujoco, "Renderer", no_gl)
    with pytest.raises(RuntimeError, match=r"could not open an offscreen OpenGL context.*BrokenEGL.*libegl1"):
        make_env("cartpole-balance", obs=("pixels",), num_envs=1, num_workers=0)
    env = make_env("cartpole-balance", obs=("state",), num_envs=1, num_workers=0)  # no renderer: still fine
    env.close()
