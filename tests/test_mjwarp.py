"""MuJoCo Warp backend (``backend="mjwarp"``) against the dm_control backend, on the CPU through Warp.

Tolerances, and why:

- Batched task functions on dm_control's own float64 ``MjData``: rewards within 1e-6 and ``state``
  observations within 1e-5 of dm_control's ``get_reward`` / ``get_observation`` (same formulas, same
  inputs; what is left is float32 rounding of the observation).
- The same functions on MuJoCo Warp's data after ``set_physics_state``: rewards within 1e-3,
  observations within 1e-3 (+ 1e-3 relative): MuJoCo Warp computes in float32, so kinematics
  carry ~1e-6 relative error, and rewards with a hard edge may flip there (they rarely do on these states).
  Quadruped's accelerometer and toe force/torque readings are left out of that comparison: they read the
  contact forces, which differ at the random (penetrating) states for the reason below.
- One control step from dm_control's state (both backends stepped from the same state each step):
  positions within 1e-5, velocities within 1e-3: float32 round-off over the step's substeps.
  Exception, quadruped: MuJoCo Warp gives plane contacts a fixed tangent frame where MuJoCo aligns it with
  the capsule's axis, and with dm_control's pyramidal friction cones that rotates the friction pyramid,
  so a sliding foot can leave a step with a velocity O(1) apart; 90% of its world-steps must be within 1e-3.
- 50 control steps open loop (same initial states, same actions): cartpole, reacher, point masses and
  cheetah within 1e-3 in positions and velocities (measured: <= 1e-4). Walker and quadruped are
  contact-rich and chaotic: the float32 round-off (and quadruped's friction frames) grows at impacts, so
  only positions are bounded, by 0.25 (measured: <= 0.09 over 6 seeds x 4 worlds); the one-step test is the
  tight check of their dynamics.

Warp compiles kernels per model on first use (about a minute each on a CPU, then cached): tests that
build envs of domains other than cheetah are marked slow.
"""

from __future__ import annotations

import copy
import importlib
import sys

import numpy as np
import pytest
import torch
from torchrl.envs.utils import check_env_specs

from latentrl.envs import get_task, make_env
from latentrl.envs.tasks import get_physics_state, set_physics_state

pytest.importorskip("mujoco_warp")

from latentrl.envs.batched_tasks import PhysicsBatch, make_batched_task, supported_tasks  # noqa: E402

N = 4
OBS = ("pixels", "state", "physics")
PARITY_TASKS = ["cheetah-run", "cartpole-swingup", "reacher-easy", "point_mass-easy",
                "point_mass_maze-reach_top_left", "walker-walk", "quadruped-walk"]
CHAOTIC = ("walker", "quadruped")
slow_unless_cheetah = [t if t.startswith("cheetah") else pytest.param(t, marks=pytest.mark.slow)
                       for t in PARITY_TASKS]


def _random_states(task_name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Physics states [n, P] around the task's initial states (half near rest, half moving fast), and controls."""
    rng = np.random.default_rng(seed)
    env = get_task(task_name).make_dm_env(seed=seed)
    model = env.physics.model.ptr
    states = []
    for i in range(n):
        env.reset()
        s = get_physics_state(env.physics)
        if i % 2:
            s[: model.nq] += rng.normal(0, 0.3, model.nq)
            s[model.nq: model.nq + model.nv] = rng.normal(0, 4.0, model.nv)
        else:  # near the model's rest pose: upright poles, targets within reach, slow
            s[: model.nq] = model.qpos0 + rng.normal(0, 0.05, model.nq)
            s[model.nq: model.nq + model.nv] = rng.normal(0, 0.5, model.nv)
        if task_name.startswith("point_mass_maze"):
            s[:2] = rng.uniform(-0.3, 0.3, 2)
            s[2:4] = rng.uniform(-0.15, 0.15, 2)
        states.append(s)
    return np.stack(states), rng.uniform(-1, 1, (n, model.nu))


def _pair(task: str, num_envs: int = N, seed: int = 0, obs=("state", "physics"), **kwargs):
    ours = make_env(task, backend="mjwarp", obs=obs, num_envs=num_envs, seed=seed, **kwargs)
    ref = make_env(task, backend="dmc", obs=obs, num_envs=num_envs, seed=seed, num_workers=0, **kwargs)
    return ours, ref


def _split(physics: torch.Tensor, env) -> tuple[torch.Tensor, torch.Tensor]:
    nq, nv = env._nq, env._nv
    return physics[:, :nq], physics[:, nq:nq + nv]


def _solver_independent_columns(env) -> torch.Tensor:
    """``state`` columns that do not depend on the contact forces.

    Quadruped's accelerometer and toe force/torque sensors read the constraint solution, which differs
    between the backends at penetrating contacts (see the module docstring); the rest must match.
    """
    keep, start = [], 0
    for key, size in env.state_layout:
        columns = list(range(start, start + size))
        if key == "imu":
            columns = columns[3:]  # accelerometer first, then gyro
        if key != "force_torque":
            keep += columns
        start += size
    return torch.tensor(keep)


# ------------------------------------------------------------------- batched functions on dm_control's data
@pytest.mark.parametrize("task_name", supported_tasks())
def test_batched_task_equals_dm_control_on_its_data(task_name):
    task = get_task(task_name)
    env = task._relabel_env
    states, actions = _random_states(task_name, 32)
    expected_reward = task.rewards_from_states(states, actions)
    datas, expected_obs = [], []
    for state, action in zip(states, actions, strict=True):
        set_physics_state(env.physics, state, action)
        datas.append(copy.copy(env.physics.data.ptr))
        observation = env.task.get_observation(env.physics)
        expected_obs.append(np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in observation.values()]))
    batched = make_batched_task(task_name, env)
    physics = PhysicsBatch.from_mujoco(env.physics.model.ptr, datas)
    np.testing.assert_allclose(batched.reward(physics).numpy(), expected_reward, atol=1e-6)
    np.testing.assert_allclose(batched.observe(physics).numpy(), np.stack(expected_obs), atol=1e-5, rtol=1e-6)


def test_unsupported_task_names_the_supported_ones():
    with pytest.raises(ValueError, match="point_mass-easy"):
        make_env("point_mass-hard", backend="mjwarp")
    with pytest.raises(ValueError, match="walker-walk"):
        make_env("finger-spin", backend="mjwarp")
    for name in ["walker-stand", "walker-walk", "walker-run", "walker-spin", "cheetah-walk", "cheetah-run",
                 "cheetah-walk_backward", "cheetah-run_backward", "quadruped-stand", "quadruped-walk",
                 "quadruped-run", "quadruped-jump", "point_mass-easy", "point_mass_maze-loop",
                 "point_mass_maze-square", "point_mass_maze-fast_slow", "point_mass_maze-reach_bottom_left_long",
                 "point_mass_maze-reach_top_right", "reacher-easy", "reacher-hard", "cartpole-swingup"]:
        assert name in supported_tasks()


def test_missing_mujoco_warp_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mujoco_warp", None)  # `import mujoco_warp` now fails
    monkeypatch.delitem(sys.modules, "latentrl.envs.mjwarp", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "latentrl\[gpu\]"'):
        make_env("cheetah-run", backend="mjwarp")
    monkeypatch.undo()
    importlib.import_module("latentrl.envs.mjwarp")


# ---------------------------------------------------------------------------------- the env (cheetah)
@pytest.fixture(scope="module")
def cheetah():
    env = make_env("cheetah-run", backend="mjwarp", obs=OBS, num_envs=2, seed=0)
    yield env
    env.close()


def test_specs_keys_and_dtypes(cheetah):
    check_env_specs(cheetah)
    td = cheetah.reset()
    assert td["pixels"].shape == (2, 3, 64, 64) and td["pixels"].dtype == torch.uint8
    assert td["state"].shape == (2, 17) and td["state"].dtype == torch.float32
    assert td["physics"].shape == (2, 18) and td["physics"].dtype == torch.float64
    assert (td["episode"] % 2).tolist() == [0, 1]
    td["action"] = cheetah.action_spec.rand()
    out = cheetah.step(td)["next"]
    assert out["reward"].shape == (2, 1) and out["reward"].dtype == torch.float32
    assert out["done"].dtype == torch.bool and out["step"].tolist() == [1, 1]
    ref = make_env("cheetah-run", obs=OBS, num_envs=2, num_workers=0)
    assert set(ref.observation_spec.keys()) == set(cheetah.observation_spec.keys())
    for key in ref.observation_spec.keys():
        assert ref.observation_spec[key].shape == cheetah.observation_spec[key].shape
        assert ref.observation_spec[key].dtype == cheetah.observation_spec[key].dtype
    assert ref.action_spec == cheetah.action_spec and ref.episode_length == cheetah.episode_length
    ref.close()


def test_pixels_look_like_dm_control_and_follow_the_pose(cheetah):
    ref = make_env("cheetah-run", obs=("pixels", "physics"), num_envs=2, num_workers=0)
    state = ref.reset()["physics"]
    ours = cheetah.set_physics_state(state)["pixels"].float()
    theirs = ref.set_physics_state(state)["pixels"].float()
    # Same scene, camera and orientation (upside down would be ~35 apart); ray-traced shading differs a little.
    assert (ours - theirs).abs().mean() < 12
    moved = state.clone()
    moved[:, 2] += 1.0  # rooty: pitch the body
    assert (cheetah.set_physics_state(moved)["pixels"].float() - ours).abs().mean() > 2
    ref.close()


def test_partial_reset_only_resets_masked_worlds(cheetah):
    td = cheetah.reset()
    first_episode = td["episode"].clone()
    for _ in range(3):
        td["action"] = cheetah.action_spec.rand()
        td = cheetah.step(td)["next"]
    before = td["physics"].clone()
    td["_reset"] = torch.tensor([[True], [False]])
    out = cheetah.reset(td)
    assert out["step"].tolist() == [0, 3]
    assert torch.equal(out["physics"][1], before[1]) and not torch.equal(out["physics"][0], before[0])
    assert out["episode"][0] == first_episode[0] + 2 and out["episode"][1] == first_episode[1]


def test_initial_states_and_rewards_match_dm_control_with_the_same_seed():
    ours, ref = _pair("cheetah-run", num_envs=2, seed=5)
    a, b = ours.reset(), ref.reset()
    torch.testing.assert_close(a["physics"], b["physics"], atol=1e-6, rtol=0)  # drawn on the CPU, stored as float32
    assert not torch.equal(a["physics"][0], a["physics"][1])
    torch.manual_seed(0)
    for _ in range(5):
        a["action"] = b["action"] = ours.action_spec.rand()
        a, b = ours.step(a)["next"], ref.step(b)["next"]
        torch.testing.assert_close(a["reward"], b["reward"], atol=1e-4, rtol=0)
    ours.close()
    ref.close()


def test_action_repeat_truncation_and_reward_sum():
    one = make_env("cheetah-run", backend="mjwarp", obs=("physics",), num_envs=2, seed=0)
    two = make_env("cheetah-run", backend="mjwarp", obs=("physics",), num_envs=2, seed=0, action_repeat=2,
                   episode_length=3)
    assert one.episode_length == 1000 and two.episode_length == 3
    a = torch.full((2, 6), 0.3)
    t1, t2 = one.reset(), two.reset()
    rewards = []
    for _ in range(4):
        t1["action"] = a
        t1 = one.step(t1)["next"]
        rewards.append(t1["reward"])
    for i in range(3):
        t2["action"] = a
        t2 = two.step(t2)["next"]
        if i == 1:  # two agent steps of two control steps each == four single control steps
            torch.testing.assert_close(t2["physics"], t1["physics"], atol=1e-6, rtol=0)
            torch.testing.assert_close(t2["reward"], rewards[2] + rewards[3], atol=1e-5, rtol=0)
        assert t2["truncated"].all().item() == (i == 2) and not t2["terminated"].any()
    assert t2["done"].all()
    one.close()
    two.close()


def test_gradient_floor_changes_pixels():
    plain = make_env("cheetah-run", backend="mjwarp", obs=("pixels", "physics"), num_envs=2, seed=0)
    gradient = make_env("cheetah-run", backend="mjwarp", obs=("pixels", "physics"), num_envs=2, seed=0,
                        floor="gradient")
    state = plain.reset()["physics"]
    state[:, 0] = torch.tensor([-10.0, 10.0])  # rootx: the tracking camera follows the body
    frames = gradient.set_physics_state(state)["pixels"].float()
    change = plain.set_physics_state(state)["pixels"].float() - frames
    assert change.abs().mean(dim=(0, 1, 3)).max() > 20  # the floor rows change colour
    floor_rgb = frames[:, :, 44:50].mean(dim=(2, 3))  # as the dmc backend: blue behind, red ahead
    assert floor_rgb[0, 2] > floor_rgb[0, 0] + 50 and floor_rgb[1, 0] > floor_rgb[1, 2] + 50
    plain.close()
    gradient.close()


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("task_name", slow_unless_cheetah)
def test_rewards_and_observations_on_warp_data_equal_dm_control(task_name):
    domain = task_name.split("-", 1)[0]
    ours, ref = _pair(task_name, num_envs=8, seed=1)
    ours.reset()
    ref.reset()  # same seeds: reacher's worlds get the same targets as dm_control's envs
    states, actions = _random_states(task_name, 8, seed=2)
    ours_obs = ours.set_physics_state(states)
    ref_obs = ref.set_physics_state(states)
    columns = _solver_independent_columns(ours)
    torch.testing.assert_close(ours_obs["state"][:, columns], ref_obs["state"][:, columns], atol=1e-3, rtol=1e-3)
    size = states.shape[1]
    same_model = [t for t in supported_tasks() if t.split("-", 1)[0] == domain
                  and get_physics_state(get_task(t)._relabel_env.physics).shape[0] == size]
    for name in same_model:
        got = ours.rewards_from_states(states, actions, task=name)
        if domain == "reacher":  # targets live in the model: compare with each dm_control env's own
            ref.set_physics_state(states)
            envs = ref._slots.envs
            expected = np.array([e.task.get_reward(e.physics) for e in envs], dtype=np.float32)
            if name != task_name:
                continue
        else:
            expected = get_task(name).rewards_from_states(states, actions)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-3, err_msg=name)
    ours.close()
    ref.close()


@pytest.mark.parametrize("task_name", slow_unless_cheetah)
def test_one_step_from_dm_control_state(task_name):
    ours, ref = _pair(task_name)
    a, b = ours.reset(), ref.reset()
    generator = torch.Generator().manual_seed(0)
    qpos_err, qvel_err = [], []
    for _ in range(50):
        a = ours.set_physics_state(b["physics"])
        a["action"] = b["action"] = torch.rand(ours.action_spec.shape, generator=generator) * 2 - 1
        a, b = ours.step(a)["next"], ref.step(b)["next"]
        (qa, va), (qb, vb) = _split(a["physics"], ours), _split(b["physics"], ours)
        qpos_err.append((qa - qb).abs().amax(-1))
        qvel_err.append((va - vb).abs().amax(-1))
    qpos_err, qvel_err = torch.cat(qpos_err), torch.cat(qvel_err)
    if task_name.startswith("quadruped"):  # see the module docstring: friction-pyramid orientation
        assert (qvel_err < 1e-3).float().mean() >= 0.9
        assert (qpos_err < 1e-5).float().mean() >= 0.9
    else:
        assert qpos_err.max() < 1e-5 and qvel_err.max() < 1e-3
    ours.close()
    ref.close()


@pytest.mark.parametrize("task_name", slow_unless_cheetah)
def test_open_loop_tracks_dm_control_for_50_steps(task_name):
    ours, ref = _pair(task_name)
    a, b = ours.reset(), ref.reset()
    torch.testing.assert_close(a["physics"], b["physics"], atol=1e-6, rtol=0)
    generator = torch.Generator().manual_seed(0)
    chaotic = task_name.startswith(CHAOTIC)
    for _ in range(50):
        a["action"] = b["action"] = torch.rand(ours.action_spec.shape, generator=generator) * 2 - 1
        a, b = ours.step(a)["next"], ref.step(b)["next"]
        (qa, va), (qb, vb) = _split(a["physics"], ours), _split(b["physics"], ours)
        if chaotic:
            assert (qa - qb).abs().max() < 0.25
        else:
            assert (qa - qb).abs().max() < 1e-3 and (va - vb).abs().max() < 1e-3
            torch.testing.assert_close(a["state"], b["state"], atol=1e-3, rtol=0)
            torch.testing.assert_close(a["reward"], b["reward"], atol=1e-3, rtol=0)
    ours.close()
    ref.close()


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["walker-walk", "quadruped-walk", "point_mass_maze-reach_top_left",
                                       "reacher-easy", "cartpole-swingup"])
def test_pixels_of_every_domain(task_name):
    env = make_env(task_name, backend="mjwarp", obs=("pixels", "physics"), num_envs=2, seed=0)
    td = env.reset()
    assert td["pixels"].shape == (2, 3, 64, 64) and td["pixels"].dtype == torch.uint8
    state = td["physics"].clone()
    state[:, :2] += 0.1
    assert not torch.equal(env.set_physics_state(state)["pixels"], td["pixels"])
    check_env_specs(env)
    env.close()


# ---------------------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("agent, extra", [("rnd", ["env.obs=[state,physics]"]),
                                          ("metra", ["eval.every=300"])])  # METRA: pixels + physics, evaluated
def test_agent_trains_on_mjwarp(tmp_path, agent, extra):
    from latentrl.training.cli import train_main

    train_main([f"agent={agent}", "preset=smoke", "env=cheetah-run", "env.backend=mjwarp", "env.num_envs=2",
                *extra, "log.progress=false", "log.tensorboard=false", f"run_dir={tmp_path}"])
    assert (tmp_path / "checkpoints" / "latest.pt").exists()
    if agent == "metra":  # the coverage evaluation ran on the batched env
        assert "eval/coverage" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
        assert list((tmp_path / "eval").glob("skills_*.png"))


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_env_matches_cpu_env():
    gpu = make_env("cheetah-run", backend="mjwarp", obs=OBS, num_envs=4, seed=0, device="cuda")
    cpu = make_env("cheetah-run", backend="mjwarp", obs=OBS, num_envs=4, seed=0, device="cpu")
    a, b = gpu.reset(), cpu.reset()
    assert a["pixels"].is_cuda and a["state"].is_cuda and a["physics"].is_cuda
    torch.testing.assert_close(a["physics"].cpu(), b["physics"], atol=1e-6, rtol=0)
    torch.manual_seed(0)
    for _ in range(20):
        action = cpu.action_spec.rand()
        a["action"], b["action"] = action.cuda(), action
        a, b = gpu.step(a)["next"], cpu.step(b)["next"]
    torch.testing.assert_close(a["physics"].cpu(), b["physics"], atol=1e-3, rtol=0)
    assert (a["pixels"].cpu().float() - b["pixels"].float()).abs().mean() < 2
    check_env_specs(gpu)  # last: its rollouts start new episodes, which draw new initial states
    gpu.close()
    cpu.close()
