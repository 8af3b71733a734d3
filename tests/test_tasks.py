"""Zero-shot evaluation tasks (latentrl.envs.custom_tasks): they build and step, and their rewards of set
physics states equal values computed by hand from the URLB / ExoRL / Meta Motivo formulas."""

from __future__ import annotations

import numpy as np
import pytest
from dm_control import suite

from latentrl.envs import custom_tasks
from latentrl.envs.custom_tasks import CUSTOM_TASKS
from latentrl.envs.tasks import get_physics_state, get_task, list_tasks, set_physics_state

CUSTOM_NAMES = sorted(f"{domain}-{task}" for domain, task in CUSTOM_TASKS)
# Meta Motivo's reach_bottom_left_long pays down to -10 for going the wrong way round the maze.
REWARD_RANGE = {"point_mass_maze-reach_bottom_left_long": (-10.0, 1.0)}


def _states(task, settings: list[dict]) -> np.ndarray:
    """Physics states ``[N, P]`` of ``task``'s model, each from the defaults with ``{(kind, name): value}``
    set (kind ``"qpos"`` or ``"qvel"``, name a joint or ``None`` for the whole vector)."""
    physics = task.make_dm_env(seed=0).physics
    states = []
    for setting in settings:
        with physics.reset_context():
            physics.data.qpos[:] = physics.model.qpos0
            physics.data.qvel[:] = 0
            for (kind, name), value in setting.items():
                array = getattr(physics.named.data, kind) if name else getattr(physics.data, kind)
                if name:
                    array[name] = value
                else:
                    array[:] = value
        states.append(get_physics_state(physics))
    return np.stack(states)


MAZE_TASKS = ["reach_top_left", "reach_top_right", "reach_bottom_left", "reach_bottom_right",
              "reach_bottom_left_long", "loop", "square", "fast_slow"]
# The TD-JEPA protocol's tasks (Meta Motivo's dmc_tasks ALL_TASKS; its domain "pointmass" is ours
# "point_mass_maze"): the suite's where it has the name, ours otherwise.
TD_JEPA_TASKS = {"walker": ["stand", "walk", "run", "spin"],
                 "cheetah": ["walk", "walk_backward", "run", "run_backward"],
                 "quadruped": ["stand", "walk", "run", "jump"], "point_mass_maze": MAZE_TASKS}


def test_custom_names_are_new_and_registered():
    assert not set(CUSTOM_TASKS) & set(suite.ALL_TASKS), "a custom task must not shadow a suite task"
    assert set(CUSTOM_NAMES) <= set(list_tasks())
    assert {"walker-spin", "walker-flip", "cheetah-walk", "cheetah-walk_backward", "cheetah-run_backward",
            "quadruped-stand", "quadruped-jump",
            "point_mass-easy_visible", *(f"point_mass_maze-{task}" for task in MAZE_TASKS)} == set(CUSTOM_NAMES)
    td_jepa = {f"{domain}-{task}" for domain, tasks in TD_JEPA_TASKS.items() for task in tasks}
    assert td_jepa <= set(list_tasks())


@pytest.mark.parametrize("name", CUSTOM_NAMES)
def test_task_builds_steps_and_relabels(name):
    task = get_task(name)
    env = task.make_dm_env(seed=0)
    assert round(env._step_limit) == 1000  # dm_control keeps time_limit / control_timestep here
    env.reset()
    spec = env.action_spec()
    rng = np.random.default_rng(0)
    states, actions, step_rewards = [], [], []
    for _ in range(5):
        action = rng.uniform(spec.minimum, spec.maximum)
        step_rewards.append(env.step(action).reward)
        states.append(get_physics_state(env.physics))
        actions.append(action)
    low, high = REWARD_RANGE.get(name, (0.0, 1.0))
    step_rewards = np.asarray(step_rewards, dtype=np.float64)
    assert np.all(np.isfinite(step_rewards)) and np.all((low <= step_rewards) & (step_rewards <= high))
    # The reward is a function of the physics state (and control): relabelling reproduces it.
    relabelled = task.rewards_from_states(np.stack(states), np.stack(actions))
    np.testing.assert_allclose(relabelled, step_rewards, atol=1e-5)


def test_loader_signature_matches_the_suite():
    load = CUSTOM_TASKS["walker", "spin"]
    env = load(time_limit=1.0, random=3, environment_kwargs={"flat_observation": True})
    assert round(env._step_limit) == 40  # 1 s at 0.025 s
    assert list(env.reset().observation) == ["observations"]


@pytest.mark.parametrize("name, expected_by_velocity", [
    # tolerance(d * v, bounds=(s, inf), margin=s, linear, value_at_margin=0) = clip(1 - (s - d * v) / s, 0, 1)
    ("cheetah-run_backward", {-12: 1.0, -10: 1.0, -5: 0.5, -2: 0.2, 0: 0.0, 5: 0.0, 10: 0.0}),
    ("cheetah-walk_backward", {-3: 1.0, -2: 1.0, -1: 0.5, -0.5: 0.25, 0: 0.0, 2: 0.0}),
    ("cheetah-walk", {3: 1.0, 2: 1.0, 1: 0.5, 0.5: 0.25, 0: 0.0, -2: 0.0}),
])
def test_cheetah_rewards_of_torso_velocity(name, expected_by_velocity):
    task = get_task(name)
    # Every body translating at v along x: the torso subtree's linear velocity is exactly v.
    states = _states(task, [{("qvel", "rootx"): v} for v in expected_by_velocity])
    expected = list(expected_by_velocity.values())
    np.testing.assert_allclose(task.rewards_from_states(states), expected, atol=1e-6)


def test_cheetah_ground_reaches_a_backward_run():
    # URLB's cheetah ground: 10 s backwards at 10 m/s ends at x = -100, still on the rendered grid.
    physics = get_task("cheetah-run_backward").make_dm_env(seed=0).physics
    model = physics.named.model
    assert model.geom_pos["ground", 0] - model.geom_size["ground", 0] <= -100


@pytest.fixture(scope="module")
def walker_spinning():
    """``spinning(angmom, torso_drop=0)``: a walker state with the body rotating rigidly about rooty so that
    its angular momentum about world y (about its centre of mass) is ``angmom``, torso lowered by
    ``torso_drop`` from its default height of 1.3 m."""
    physics = get_task("walker-spin").make_dm_env(seed=0).physics
    with physics.reset_context():
        physics.data.qpos[:] = 0
    # Moment of inertia about y through the centre of mass, summed by hand over the bodies (all in the
    # torso's subtree): rotating rigidly at w about rooty gives angular momentum I_yy * w about y.
    mass, xipos = physics.model.body_mass[1:], physics.data.xipos[1:]
    com = mass @ xipos / mass.sum()
    inertia_yy = 0.0
    for b in range(1, physics.model.nbody):
        rot = physics.data.ximat[b].reshape(3, 3)
        offset = physics.data.xipos[b] - com
        inertia_yy += (rot @ np.diag(physics.model.body_inertia[b]) @ rot.T)[1, 1]
        inertia_yy += physics.model.body_mass[b] * (offset[0] ** 2 + offset[2] ** 2)
    axis_y = physics.named.model.jnt_axis["rooty"][1]

    def spinning(angmom, torso_drop=0.0):
        angular_velocity = angmom / inertia_yy / axis_y
        return {("qpos", None): 0.0, ("qpos", "rootz"): -torso_drop, ("qvel", "rooty"): angular_velocity}

    return spinning


def test_walker_states_have_the_set_angular_momentum(walker_spinning):
    # Guards the hand-computed inertia the reward tests rely on: the sign and size of the y component.
    task = get_task("walker-spin")
    env = task.make_dm_env(seed=0)
    for angmom in (-5.0, 2.5, 10.0):
        state = _states(task, [walker_spinning(angmom)])[0]
        set_physics_state(env.physics, state)
        assert env.physics.named.data.subtree_angmom["torso", "y"] == pytest.approx(angmom, rel=1e-6)


def test_walker_spin_rewards_of_angular_momentum(walker_spinning):
    # Meta Motivo's spin: clip(1 - (10 - L) / 10, 0, 1) = clip(L / 10, 0, 1), whatever the posture (no stand
    # term: the torso dropped to 0.6 m, where walker-flip's stand reward is 0.325, changes nothing).
    task = get_task("walker-spin")
    cases = [(walker_spinning(20.0), 1.0), (walker_spinning(10.0), 1.0), (walker_spinning(7.5), 0.75),
             (walker_spinning(5.0), 0.5), (walker_spinning(2.5), 0.25), (walker_spinning(0.0), 0.0),
             (walker_spinning(-10.0), 0.0), (walker_spinning(5.0, torso_drop=0.7), 0.5),
             (walker_spinning(10.0, torso_drop=0.7), 1.0)]
    states = _states(task, [setting for setting, _ in cases])
    np.testing.assert_allclose(task.rewards_from_states(states), [r for _, r in cases], atol=1e-6)


def test_walker_flip_rewards_of_angular_momentum(walker_spinning):
    task = get_task("walker-flip")
    # Upright with the torso at 1.3 m (>= _STAND_HEIGHT 1.2): stand reward 1, reward (5 * flip + 1) / 6 with
    # flip = clip(1 - (5 - L) / 5, 0, 1). Torso dropped to 0.6 m (one margin, 0.6, below 1.2): standing is
    # the gaussian's value at the margin, 0.1, so stand = (3 * 0.1 + 1) / 4 = 0.325.
    cases = [(walker_spinning(10.0), 1.0), (walker_spinning(5.0), 1.0),
             (walker_spinning(2.5), (5 * 0.5 + 1) / 6), (walker_spinning(0.0), 1 / 6),
             (walker_spinning(-5.0), 1 / 6), (walker_spinning(5.0, torso_drop=0.7), 0.325),
             (walker_spinning(2.5, torso_drop=0.7), 0.325 * 3.5 / 6)]
    states = _states(task, [setting for setting, _ in cases])
    np.testing.assert_allclose(task.rewards_from_states(states), [r for _, r in cases], atol=1e-6)


def test_quadruped_stand_and_jump_rewards():
    stand, jump = get_task("quadruped-stand"), get_task("quadruped-jump")
    physics = stand.make_dm_env(seed=0).physics
    upright, upside_down = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]
    tilted = [np.cos(np.pi / 4), np.sin(np.pi / 4), 0.0, 0.0]  # 90 degrees about x

    def at_com_height(quat, height):
        """Root pose with orientation ``quat`` whose centre of mass (by hand: mass-weighted body COMs) is at
        ``height``."""
        with physics.reset_context():
            physics.named.data.qpos["root"] = [0.0, 0.0, 0.0, *quat]
        mass = physics.model.body_mass[1:]
        com_z = mass @ physics.data.xipos[1:, 2] / mass.sum()
        return {("qpos", "root"): [0.0, 0.0, height - com_z, *quat]}

    # upright = clip(1 - (1 - torso_zz) / 2, 0, 1): 1 upright, 0.5 on its side (zz = 0), 0 upside down.
    # jump = upright * clip(1 - 0.5 * (1 - com_z), 0, 1) below 1 m (value 0.5 at the margin, com_z = 0).
    cases = [  # (setting, stand, jump)
        (at_com_height(upright, 1.2), 1.0, 1.0),
        (at_com_height(upright, 1.0), 1.0, 1.0),
        (at_com_height(upright, 0.5), 1.0, 0.75),
        (at_com_height(upright, 0.2), 1.0, 0.6),
        (at_com_height(tilted, 1.0), 0.5, 0.5),
        (at_com_height(tilted, 0.5), 0.5, 0.375),
        (at_com_height(upside_down, 1.0), 0.0, 0.0),
    ]
    states = _states(stand, [setting for setting, _, _ in cases])
    np.testing.assert_allclose(stand.rewards_from_states(states), [s for _, s, _ in cases], atol=1e-6)
    np.testing.assert_allclose(jump.rewards_from_states(states), [j for _, _, j in cases], atol=1e-6)


CORNERS = {"top_left": (-0.15, 0.15), "top_right": (0.15, 0.15), "bottom_left": (-0.15, -0.15),
           "bottom_right": (0.15, -0.15)}


def _maze_states(task, points):
    """States with the point mass at ``(x, y)`` moving at ``(vx, vy)`` for each ``(x, y, vx, vy)``."""
    return _states(task, [{("qpos", None): p[:2], ("qvel", None): p[2:]} for p in points])


# Gaussian tolerance outside bounds (0, 0.015) with margin m: 0.1 ** (((distance - 0.015) / m) ** 2).
REACH_MARGIN = 6 * 0.015  # Meta Motivo's (TD-JEPA's); ExoRL's is 0.015


@pytest.mark.parametrize("corner", list(CORNERS))
def test_maze_reach_rewards(corner):
    task = get_task(f"point_mass_maze-reach_{corner}")
    x, y = CORNERS[corner]
    inward = -np.sign(x)  # towards the centre along x, staying in the corner's room's half-plane

    def off_target(distance):
        return (x + inward * distance, y, 0, 0)

    states = _maze_states(task, [(x, y, 0, 0)] * 4 + [off_target(0.01), off_target(0.015 + REACH_MARGIN),
                                                       off_target(0.015 + REACH_MARGIN / 2), (-x, -y, 0, 0)]
                          + [(*CORNERS[other], 0, 0) for other in CORNERS if other != corner])
    actions = np.array([[0, 0], [1, 1], [0.5, 0], [-1, 0]] + [[0, 0]] * 7, dtype=np.float64)
    rewards = task.rewards_from_states(states, actions)
    # near_target: 1 inside 0.015 of the target, the gaussian's 0.1 at one margin (0.09) beyond, 0.1 ** 0.25
    # at half a margin. small_control = (4 + mean(1 - u**2)) / 5: 1 at rest, 0.8 at full thrust,
    # (4 + 0.875) / 5 = 0.975, 0.9 with one control at full thrust.
    np.testing.assert_allclose(rewards[:7], [1.0, 0.8, 0.975, 0.9, 1.0, 0.1, 0.1 ** 0.25], atol=1e-6)
    # The opposite corner (0.42 away) and the other targets (0.3 away) are > 3 margins off: 0.1 ** 10.
    assert np.all(rewards[7:] < 1e-9), "far from the target (another corner) the reward must vanish"


def test_maze_reach_margin_is_an_argument():
    # ExoRL's margin (0.015): 0.1 at 0.03 from the target, where Meta Motivo's (0.09, the registered task's)
    # still pays 0.1 ** (((0.03 - 0.015) / 0.09) ** 2) = 0.1 ** (1 / 36).
    task = get_task("point_mass_maze-reach_top_left")
    env = task.make_dm_env(seed=0)
    x, y = CORNERS["top_left"]
    state = _maze_states(task, [(x + 0.03, y, 0, 0)])[0]
    set_physics_state(env.physics, state)
    exorl = custom_tasks.PointMassMazeReach("top_left", margin=0.015)
    meta_motivo = custom_tasks.PointMassMazeReach("top_left")
    assert exorl.get_reward(env.physics) == pytest.approx(0.1, abs=1e-6)
    assert meta_motivo.get_reward(env.physics) == pytest.approx(0.1 ** (1 / 36), abs=1e-6)
    assert task.rewards_from_states(state[None])[0] == pytest.approx(0.1 ** (1 / 36), abs=1e-6)


def test_maze_reach_without_actions_relabels_with_zero_control():
    task = get_task("point_mass_maze-reach_bottom_right")
    states = _maze_states(task, [(*CORNERS["bottom_right"], 0, 0)] * 2)
    thrust = np.ones((2, 2))
    np.testing.assert_allclose(task.rewards_from_states(states, thrust), [0.8, 0.8], atol=1e-6)
    # No actions: the control is zeroed (not the last one set), so the control term is 1.
    np.testing.assert_allclose(task.rewards_from_states(states), [1.0, 1.0], atol=1e-6)


def test_maze_episodes_start_at_rest_in_the_top_left_room():
    def start(seed):
        env = get_task("point_mass_maze-loop").make_dm_env(seed=seed)
        env.reset()
        assert env.control_timestep() == pytest.approx(0.02)
        return env.physics.data.qpos.copy(), env.physics.data.qvel.copy()

    starts = [start(seed) for seed in range(8)]
    for qpos, qvel in starts:
        assert -0.29 <= qpos[0] <= -0.15 and 0.15 <= qpos[1] <= 0.29
        np.testing.assert_array_equal(qvel, 0.0)
    # Meta Motivo draws the start from the task's random (ExoRL from NumPy's global one): seeded starts.
    np.testing.assert_array_equal(start(3)[0], starts[3][0])
    assert len({tuple(qpos) for qpos, _ in starts}) == len(starts)


def test_maze_reach_bottom_left_long_rewards():
    task = get_task("point_mass_maze-reach_bottom_left_long")
    cases = [
        ((-0.15, -0.15, 0, 0), 1.0),  # at the target
        ((-0.15, -0.045, 0, 0), 0.1),  # one Meta Motivo margin (0.09) beyond the target's 0.015
        ((0.0, 0.25, 0.1, 0), 0.5),  # top corridor, clockwise (+x): 5 * 0.1
        ((0.0, 0.25, 0.05, 0), 0.25),
        ((0.0, 0.25, 0.3, 0), 0.5),  # speed clipped at 0.1
        ((0.0, 0.25, -0.1, 0), -10.0),  # the wrong way: 100 * -0.1
        ((0.25, 0.0, 0, -0.1), 0.5),  # right corridor, clockwise (-y)
        ((0.0, -0.25, -0.1, 0), 0.5),  # bottom corridor, clockwise (-x)
        ((-0.25, 0.0, 0, 0.1), 0.5),  # left corridor, clockwise (+y)
        ((-0.25, 0.25, 0.1, 0.1), 0.0),  # two corridors cross
        ((0.1, 0.1, 0.1, 0.1), 0.0),  # in no corridor
    ]
    states = _maze_states(task, [p for p, _ in cases])
    rewards = task.rewards_from_states(states, np.zeros((len(cases), 2)))
    np.testing.assert_allclose(rewards, [r for _, r in cases], atol=1e-6)


def test_maze_loop_square_fast_slow_rewards():
    off_line = 0.24 + 0.03 * np.sqrt(2)  # 0.03 from the diamond |x| + |y| = 0.24: on_line = 1 - 0.01 / 0.02
    cases = {
        # (on_line + vx_ok + vy_ok) / 3; clockwise speeds in [0.06, 0.1], linear to 0 within 0.01.
        "loop": [((-0.12, 0.12, 0.08, 0.08), 1.0), ((-0.12, 0.12, 0.055, 0.08), 2.5 / 3),
                 ((0.12, -0.12, -0.08, -0.08), 1.0), ((0.12, 0.12, 0.08, 0.08), 2 / 3),
                 ((0.0, off_line, 0.08, 0.08), 2.5 / 3), ((-0.12, -0.12, -0.08, 0.08), 1.0),
                 ((-0.24, 0.0, 0.08, 0.08), 1.0)],  # y = 0 belongs to the top half
        # 10 * clockwise speed, clipped to [0, 1], in the corridors beyond |0.2|.
        "square": [((0.0, 0.25, 0.05, 0), 0.5), ((0.0, 0.25, 0.2, 0), 1.0), ((0.0, 0.25, -0.05, 0), 0.0),
                   ((0.25, 0.0, 0, -0.07), 0.7), ((-0.25, 0.0, 0, 0.03), 0.3), ((0.0, -0.25, -0.1, 0), 1.0),
                   ((0.25, 0.25, 0.1, -0.1), 0.0), ((0.1, 0.1, 0.1, 0.1), 0.0)],
        # speed bands in 0.2 < |coordinate| < 0.28: top vx in [-0.05, -0.04], right vy in [0.09, 0.1], ...
        "fast_slow": [((0.0, 0.24, -0.045, 0), 1.0), ((0.0, 0.24, -0.035, 0), 0.5),
                      ((0.0, 0.285, -0.045, 0), 0.0), ((-0.24, 0.0, 0, -0.095), 1.0),
                      ((0.24, 0.0, 0, 0.085), 0.5), ((0.0, -0.24, 0.045, 0), 1.0),
                      ((0.24, 0.24, -0.045, 0.095), 0.0), ((0.1, 0.1, -0.045, 0.095), 0.0)],
    }
    for name, expected in cases.items():
        task = get_task(f"point_mass_maze-{name}")
        rewards = task.rewards_from_states(_maze_states(task, [p for p, _ in expected]))
        np.testing.assert_allclose(rewards, [r for _, r in expected], atol=1e-6, err_msg=name)


def _push(start, action, steps=100):
    """Final (x, y) of the point mass started at rest at ``start`` and pushed with ``action``."""
    env = get_task("point_mass_maze-reach_top_left").make_dm_env(seed=0)
    env.reset()
    with env.physics.reset_context():
        env.physics.data.qpos[:] = start
        env.physics.data.qvel[:] = 0
    for _ in range(steps):
        env.step(np.asarray(action, dtype=np.float64))
    return env.physics.data.qpos.copy()


def test_maze_walls_stop_the_point_mass():
    # 2 s of full thrust moves the mass ~0.18 m in open space (terminal speed 0.1 m/s).
    x, y = _push((-0.1, 0.1), (1.0, 0.0))
    assert x == pytest.approx(-0.03, abs=2e-3), "the inner wall (|x| < 0.02) stops a mass of radius 0.01"
    assert y == pytest.approx(0.1, abs=1e-3)
    x, y = _push((-0.1, 0.25), (1.0, 0.0))
    assert x > 0.05, "the gap between the inner wall's end (0.18) and the outer wall lets it through"
    x, y = _push((0.1, 0.1), (0.0, -1.0))
    assert y == pytest.approx(0.03, abs=2e-3)
    x, y = _push((-0.2, 0.2), (-1.0, 1.0))
    assert x >= -0.291 and y <= 0.291, "the outer walls bound the arena"


def test_unknown_task_suggests_the_right_name():
    with pytest.raises(ValueError, match="walker-spin"):
        get_task("walker-spn")


def test_point_mass_easy_visible_changes_the_picture_only():
    """``point_mass-easy_visible`` steps exactly like ``point_mass-easy`` (same physics and rewards under
    the same actions and seed) while its point mass covers several times more pixels."""
    import torch

    from latentrl.envs import make_env

    runs = {}
    for name in ("point_mass-easy", "point_mass-easy_visible"):
        env = make_env(name, obs=("pixels", "physics"), num_envs=2, num_workers=0, seed=4)
        try:
            td = env.reset()
            frames, physics, rewards = [td["pixels"]], [td["physics"]], []
            gen = torch.Generator().manual_seed(0)
            for _ in range(5):
                td["action"] = torch.rand(2, 2, generator=gen) * 2 - 1
                td = env.step(td)["next"]
                frames.append(td["pixels"])
                physics.append(td["physics"])
                rewards.append(td["reward"])
        finally:
            env.close()
        runs[name] = (torch.stack(frames), torch.stack(physics), torch.stack(rewards))
    (f0, p0, r0), (f1, p1, r1) = runs["point_mass-easy"], runs["point_mass-easy_visible"]
    assert torch.equal(p0, p1) and torch.equal(r0, r1)
    differ = (f0 != f1).any(dim=-3).float().sum(dim=(-1, -2))  # pixels that differ, per frame and env
    assert differ.min() > 10, "the larger mass must be drawn in every frame"
