"""Zero-shot evaluation tasks of the URLB / ExoRL / Meta Motivo / TD-JEPA protocol, as dm_control tasks.

Each task is a reward function of the physics state (qpos, qvel, the control, and quantities that
``mj_forward`` / ``mj_subtreeVel`` derive from them), built on dm_control's own domain ``Physics`` and
``Task`` classes, so that :mod:`latentrl.envs.tasks` can relabel any stored state with any task.

The TD-JEPA protocol is Meta Motivo's task list (``metamotivo/envs/dmc_tasks/__init__.py``): walker
stand / walk / run / spin, cheetah walk / walk_backward / run / run_backward, quadruped stand / walk / run /
jump, and the point-mass maze's eight tasks. Meta Motivo loads every name dm_control's suite has from the
suite itself (walker stand / walk / run, cheetah run, quadruped walk / run), so those are not redefined
here; the rest are below, with Meta Motivo's definitions. Tasks (1000 control steps per episode each):

- ``walker-spin``: Meta Motivo's walker ``spin``, ``tolerance(L, (10, inf), margin=10, linear,
  value_at_margin=0)`` with ``L = subtree_angmom['torso'][1]`` (the walker's angular momentum about +y,
  about its centre of mass), and no stand term: the walker is paid for spinning in any posture.
- ``walker-flip``: URLB's (and Meta Motivo's) walker ``flip``: ``stand * (5 * flip + 1) / 6`` with the
  suite's stand reward ``(3 * tolerance(torso_z, (1.2, inf), margin=0.6) + (1 + torso_zz) / 2) / 4`` and
  ``flip = tolerance(L, (5, inf), margin=5, linear, value_at_margin=0)``. Not in the TD-JEPA list.
  Both walker tasks: the suite's walker model, 25 s at a control timestep of 0.025 s.
- ``cheetah-walk`` / ``-walk_backward`` / ``-run_backward``:
  ``tolerance(d * v_x, (s, inf), margin=s, linear, value_at_margin=0)`` on the torso subtree's linear
  velocity ``v_x``, with direction ``d = +1 / -1 / -1`` and speed ``s = 2 / 2 / 10``. 10 s at the model's
  0.01 s timestep. The ground is lengthened to URLB's and Meta Motivo's 400 m (x in [-102, 298]) so that a
  cheetah running backwards stays on the rendered grid; MuJoCo planes collide everywhere, so dynamics are
  the suite's. (``cheetah-run`` is the suite's, on its 200 m ground, as in Meta Motivo.)
- ``quadruped-stand``: the suite's upright reward ``tolerance(torso_zz, (1, inf), margin=2, linear,
  value_at_margin=0)``. ``quadruped-jump``: ``upright * tolerance(com_z, (1, inf), margin=1, linear,
  value_at_margin=0.5)`` with ``com_z`` the height of the torso subtree's centre of mass. Both on the
  suite's model as ``quadruped.make_model(floor_size=10)`` builds it for ``walk``; 20 s at 0.02 s.
  The suite's ``quadruped-walk`` / ``-run`` are URLB's and Meta Motivo's: both load them from dm_control
  itself, and ExoRL's multitask walk/run use the same formula and speeds (``upright * tolerance(v_x,
  (s, inf), margin=s, linear, value_at_margin=0.5)``, s = 0.5 / 5). So they are not redefined here.
- ``point_mass_maze-*`` (Meta Motivo's domain ``pointmass``): a point mass in a four-room maze
  (``assets/point_mass_maze.xml``), starting at rest at a uniform position in the top-left room
  (x in [-0.29, -0.15], y in [0.15, 0.29]) drawn from the task's own ``random``; 20 s at the model's
  0.02 s timestep. ``reach_<corner>``: ``tolerance(|p - target|, (0, 0.015), margin=0.09) * (4 +
  mean(tolerance(ctrl, margin=1, quadratic, value_at_margin=0))) / 5`` with targets at (+-0.15, +-0.15).
  ``reach_bottom_left_long``, ``loop``, ``square`` and ``fast_slow`` are Meta Motivo's only (formulas on
  their classes below); ``reach_bottom_left_long`` pays negative rewards (down to -10) for going the wrong
  way round the maze, so its range is [-10, 1], not [0, 1].

  Where ExoRL's point-mass maze (which the reach tasks come from) differs, we follow Meta Motivo:
  ExoRL's reach margin is the target size, 0.015 (Meta Motivo: ``6 * 0.015 = 0.09``, a much wider basin;
  :class:`PointMassMazeReach` takes the margin as an argument); ExoRL draws the start position from
  NumPy's global generator, so its task seed does not set it (Meta Motivo: the task's ``random``); ExoRL
  builds one model per reach task with its target visible (Meta Motivo: one model, ``pointmass_nogoal``,
  whose one target geom is parked out of view at (-1, -1)); ExoRL measures the distance in 3-D to a target
  at the mass's height, which equals Meta Motivo's 2-D distance. Episode length (20 s) and control timestep
  (0.02 s, the model's) are the same in both.

The reach rewards read the control: relabel them with the actions
(``Task.rewards_from_states(states, actions)``), as TD-JEPA's relabeller does. Without actions the
control is zero, so the control term is 1.

Sources (read for facts, not copied): rll-research/url_benchmark ``custom_dmc_tasks/{walker,cheetah,
quadruped}.py``; denisyarats/exorl ``custom_dmc_tasks/point_mass_maze.py`` and
``point_mass_maze_reach_*.xml`` (URLB itself has no point-mass maze); Meta Motivo's
``metamotivo/envs/dmc_tasks/{__init__,dmc,pointmass,cheetah,walker,quadruped}.py`` and its
``{walker,cheetah,quadruped,pointmass_nogoal}.xml`` as published in the TD-JEPA code
(marbaga/td_jepa_public; facebookresearch/metamotivo's snapshot here has no ``dmc_tasks``). Meta Motivo's
walker and quadruped models are the suite's, its cheetah's is the suite's with URLB's ground; its maze
model has the same bodies, joints, actuators and walls as ours (walls written with ``zaxis``), so the
dynamics are identical, and one extra collision-free target geom out of view.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from dm_control import mujoco
from dm_control.rl import control
from dm_control.suite import base, cheetah, common, quadruped, walker
from dm_control.suite.utils import randomizers
from dm_control.utils import rewards
from lxml import etree

__all__ = ["CUSTOM_TASKS"]


def _linear(x: float, bounds: tuple[float, float], margin: float, value_at_margin: float = 0.0) -> float:
    """``rewards.tolerance`` with the linear sigmoid, the shape most of these tasks use."""
    return float(rewards.tolerance(x, bounds=bounds, margin=margin, sigmoid="linear",
                                   value_at_margin=value_at_margin))


def _loader(
    make_physics: Callable[[], mujoco.Physics], make_task: Callable[..., base.Task],
    default_time_limit: float, control_timestep: float | None = None,
) -> Callable[..., control.Environment]:
    """A loader with the signature of dm_control's suite loaders (``time_limit=None`` = the default)."""

    def load(time_limit: float | None = None, random=None, environment_kwargs: dict | None = None):
        kwargs = {} if control_timestep is None else {"control_timestep": control_timestep}
        kwargs.update(environment_kwargs or {})
        return control.Environment(
            make_physics(), make_task(random=random),
            time_limit=default_time_limit if time_limit is None else time_limit, **kwargs,
        )

    return load


# --- walker (Meta Motivo dmc_tasks/walker.py "spin" and "flip"; URLB custom_dmc_tasks/walker.py "flip") -----

_WALKER_TIME_LIMIT = 25
_WALKER_CONTROL_TIMESTEP = 0.025
_WALKER_SPIN_MOMENTUM = 10  # Meta Motivo's spin
_WALKER_FLIP_MOMENTUM = 5  # URLB's and Meta Motivo's flip (their _SPIN_SPEED)


def _walker_angular_momentum(physics: walker.Physics) -> float:
    """Angular momentum about +y of the whole walker (the torso's subtree) about its centre of mass."""
    return float(physics.named.data.subtree_angmom["torso"][1])


class WalkerSpin(walker.PlanarWalker):
    """Spin with angular momentum ``momentum`` or more about world +y (top towards +x), in any posture."""

    def __init__(self, momentum: float = _WALKER_SPIN_MOMENTUM, random=None):
        super().__init__(move_speed=0, random=random)
        self._momentum = momentum

    def get_reward(self, physics: walker.Physics) -> float:
        momentum = _walker_angular_momentum(physics)
        return _linear(momentum, (self._momentum, float("inf")), margin=self._momentum)


class WalkerFlip(walker.PlanarWalker):
    """Stand up and flip: the suite's stand reward times a reward on the angular momentum about y."""

    def __init__(self, momentum: float = _WALKER_FLIP_MOMENTUM, random=None):
        # move_speed=0 makes the suite's get_reward the plain stand reward, reused below.
        super().__init__(move_speed=0, random=random)
        self._momentum = momentum

    def get_reward(self, physics: walker.Physics) -> float:
        stand_reward = super().get_reward(physics)
        flip_reward = _linear(_walker_angular_momentum(physics), (self._momentum, float("inf")),
                              margin=self._momentum)
        return stand_reward * (5 * flip_reward + 1) / 6


def _walker_physics() -> walker.Physics:
    return walker.Physics.from_xml_string(*walker.get_model_and_assets())


# --- cheetah (URLB custom_dmc_tasks/cheetah.py; walk speeds from Meta Motivo dmc_tasks/cheetah.py) --------

_CHEETAH_TIME_LIMIT = 10
_CHEETAH_WALK_SPEED = 2
_CHEETAH_RUN_SPEED = 10
_CHEETAH_GROUND_SIZE = "200 .8 .5"  # URLB's cheetah.xml; the suite's is "100 .8 .5"


class CheetahMove(cheetah.Cheetah):
    """Move at ``speed`` or faster, forwards or backwards (the suite's run reward, with a direction)."""

    def __init__(self, speed: float, forward: bool = True, random=None):
        super().__init__(random=random)
        self._speed = speed
        self._direction = 1.0 if forward else -1.0

    def get_reward(self, physics: cheetah.Physics) -> float:
        return _linear(self._direction * physics.speed(), (self._speed, float("inf")), margin=self._speed)


@functools.cache
def _cheetah_xml() -> bytes:
    mjcf = etree.XML(common.read_model("cheetah.xml"), etree.XMLParser(remove_blank_text=True))
    mjcf.find(".//geom[@name='ground']").attrib["size"] = _CHEETAH_GROUND_SIZE
    return etree.tostring(mjcf, pretty_print=True)


def _cheetah_physics() -> cheetah.Physics:
    return cheetah.Physics.from_xml_string(_cheetah_xml(), common.ASSETS)


# --- quadruped (URLB custom_dmc_tasks/quadruped.py) -------------------------------------------------------

_QUADRUPED_TIME_LIMIT = 20
_QUADRUPED_CONTROL_TIMESTEP = 0.02
_QUADRUPED_FLOOR_SIZE = 10  # URLB: _DEFAULT_TIME_LIMIT * _WALK_SPEED = 20 * 0.5, as the suite's walk
_QUADRUPED_JUMP_HEIGHT = 1.0


class QuadrupedPhysics(quadruped.Physics):
    """The suite's quadruped physics plus the centre-of-mass height URLB's jump reads."""

    def com_height(self) -> float:
        """Height of the centre of mass of the torso subtree (the ``center_of_mass`` subtreecom sensor)."""
        return float(self.named.data.sensordata["center_of_mass"][2])


class QuadrupedStand(quadruped.Move):
    """Stay upright (the suite's Move task's episodes and observations, reward without the move term)."""

    def __init__(self, random=None):
        super().__init__(desired_speed=0, random=random)

    def get_reward(self, physics: QuadrupedPhysics) -> float:
        return float(quadruped._upright_reward(physics))


class QuadrupedJump(quadruped.Move):
    """Stay upright with the centre of mass at ``desired_height`` or higher."""

    def __init__(self, desired_height: float = _QUADRUPED_JUMP_HEIGHT, random=None):
        super().__init__(desired_speed=0, random=random)
        self._desired_height = desired_height

    def get_reward(self, physics: QuadrupedPhysics) -> float:
        jump_up = _linear(physics.com_height(), (self._desired_height, float("inf")),
                          margin=self._desired_height, value_at_margin=0.5)
        return float(quadruped._upright_reward(physics)) * jump_up


@functools.cache
def _quadruped_xml() -> bytes:
    return quadruped.make_model(floor_size=_QUADRUPED_FLOOR_SIZE)


def _quadruped_physics() -> QuadrupedPhysics:
    return QuadrupedPhysics.from_xml_string(_quadruped_xml(), common.ASSETS)


# --- point_mass_maze (ExoRL custom_dmc_tasks/point_mass_maze.py; Meta Motivo dmc_tasks/pointmass.py) -----

_MAZE_XML = Path(__file__).parent / "assets" / "point_mass_maze.xml"
_MAZE_TIME_LIMIT = 20
_MAZE_TARGET_SIZE = 0.015
_MAZE_REACH_MARGIN = 6 * _MAZE_TARGET_SIZE  # Meta Motivo's (and so TD-JEPA's); ExoRL's is _MAZE_TARGET_SIZE
_MAZE_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
# Start room (top left), as both ExoRL and Meta Motivo sample it (Meta Motivo with the task's random).
_MAZE_START_X = (-0.29, -0.15)
_MAZE_START_Y = (0.15, 0.29)


class PointMassMazePhysics(mujoco.Physics):
    """Physics of the point-mass maze."""

    def mass_position(self) -> np.ndarray:
        """``[2]`` x, y of the point mass."""
        return self.named.data.geom_xpos["pointmass"][:2].copy()

    def target_position(self, corner: str) -> np.ndarray:
        """``[2]`` x, y of the target site of ``corner`` (``"top_left"``, ...)."""
        return self.named.model.site_pos[f"target_{corner}"][:2].copy()


def _maze_physics() -> PointMassMazePhysics:
    return PointMassMazePhysics.from_xml_string(_MAZE_XML.read_text(), common.ASSETS)


class PointMassMaze(base.Task):
    """Episodes start at rest in the top-left room; observations are the position and velocity."""

    def initialize_episode(self, physics: PointMassMazePhysics) -> None:
        # Randomise first (then overwrite), as Meta Motivo does, so seeds draw the same starts.
        randomizers.randomize_limited_and_rotational_joints(physics, self.random)
        physics.data.qpos[0] = self.random.uniform(*_MAZE_START_X)
        physics.data.qpos[1] = self.random.uniform(*_MAZE_START_Y)
        super().initialize_episode(physics)

    def get_observation(self, physics: PointMassMazePhysics) -> collections.OrderedDict:
        obs = collections.OrderedDict()
        obs["position"] = physics.position()
        obs["velocity"] = physics.velocity()
        return obs


def _reach_reward(physics: PointMassMazePhysics, corner: str, margin: float) -> float:
    """Near the target (gaussian tolerance) times a small-control bonus in [0.8, 1]."""
    control_reward = rewards.tolerance(physics.control(), margin=1, value_at_margin=0, sigmoid="quadratic")
    small_control = (control_reward.mean() + 4) / 5
    distance = np.linalg.norm(physics.target_position(corner) - physics.mass_position())
    near_target = rewards.tolerance(distance, bounds=(0, _MAZE_TARGET_SIZE), margin=margin)
    return float(near_target * small_control)


class PointMassMazeReach(PointMassMaze):
    """Reach the target in ``corner``; ``margin`` is Meta Motivo's 0.09 by default (ExoRL's: 0.015)."""

    def __init__(self, corner: str, margin: float = _MAZE_REACH_MARGIN, random=None):
        if corner not in _MAZE_CORNERS:
            raise ValueError(f"unknown corner {corner!r}; valid corners: {', '.join(_MAZE_CORNERS)}")
        super().__init__(random=random)
        self._corner = corner
        self._margin = margin

    def get_reward(self, physics: PointMassMazePhysics) -> float:
        return _reach_reward(physics, self._corner, self._margin)


def _corridors(x: float, y: float, edge: float) -> tuple[int, int, int, int]:
    """Indicators ``(up, right, left, down)`` of the bands beyond ``+-edge`` along the four outer walls."""
    return int(y > edge), int(x > edge), int(x < -edge), int(y < -edge)


class PointMassMazeReachLong(PointMassMaze):
    """Meta Motivo's ``reach_bottom_left_long``: reach the bottom-left target the long way round.

    Near the target the reach reward with margin 0.09; where that is below 0.01, a reward for going
    clockwise along the outer corridors (|coordinate| > 0.15): ``5 * speed`` along the way, up to 0.5,
    and ``100 * speed`` against it, down to -10; 0 where two corridors cross.
    """

    def get_reward(self, physics: PointMassMazePhysics) -> float:
        reward = _reach_reward(physics, "bottom_left", _MAZE_REACH_MARGIN)
        if reward >= 0.01:
            return reward
        (x, y), (vx, vy) = physics.position(), physics.velocity()
        up, right, left, down = _corridors(x, y, 0.15)
        if up + right + left + down > 1:
            return 0.0

        def along(v: float, sign: float) -> float:  # velocity clipped to +-0.1, ``sign`` the way round
            v = sign * float(np.clip(v, -0.1, 0.1))
            return v * (5 if v >= 0 else 100)

        return up * along(vx, 1) + right * along(vy, -1) + left * along(vy, 1) + down * along(vx, -1)


class PointMassMazeLoop(PointMassMaze):
    """Meta Motivo's ``loop``: go clockwise round the diamond ``|x| + |y| = 0.24``.

    ``(on_line + v_x_ok + v_y_ok) / 3``: ``on_line`` is 1 within 0.02 of the quadrant's side of the diamond,
    falling linearly to 0 at 0.04; ``v_*_ok`` is 1 for a clockwise speed in [0.06, 0.1] along that axis,
    falling linearly to 0 0.01 outside. Quadrants: x <= 0 is left, y >= 0 is top.
    """

    def get_reward(self, physics: PointMassMazePhysics) -> float:
        (x, y), (vx, vy) = physics.position(), physics.velocity()
        # Clockwise direction of travel in this quadrant: top left goes (+, +), top right (+, -), ...
        sx = 1.0 if y >= 0 else -1.0
        sy = 1.0 if x <= 0 else -1.0
        distance = abs(abs(x) + abs(y) - 0.24) / np.sqrt(2)
        on_line = _linear(distance, (0, 0.02), margin=0.02)
        vx_ok = _linear(sx * vx, (0.06, 0.1), margin=0.01)
        vy_ok = _linear(sy * vy, (0.06, 0.1), margin=0.01)
        return (on_line + vx_ok + vy_ok) / 3


class PointMassMazeSquare(PointMassMaze):
    """Meta Motivo's ``square``: go clockwise along the outer corridors (|coordinate| > 0.2).

    In one corridor, ``10 * speed`` clockwise clipped to [0, 1]; 0 outside the corridors and where two cross.
    """

    def get_reward(self, physics: PointMassMazePhysics) -> float:
        (x, y), (vx, vy) = physics.position(), physics.velocity()
        up, right, left, down = _corridors(x, y, 0.2)
        if up + right + left + down > 1:
            return 0.0
        clockwise = up * vx - right * vy + left * vy - down * vx
        return float(np.clip(clockwise, 0, 0.1) * 10)


class PointMassMazeFastSlow(PointMassMaze):
    """Meta Motivo's ``fast_slow``: go anticlockwise along the walls, slowly along the top and bottom.

    In the bands 0.2 < |coordinate| < 0.28: along the top ``v_x`` in [-0.05, -0.04], down the left side
    ``v_y`` in [-0.1, -0.09], along the bottom ``v_x`` in [0.04, 0.05], up the right side ``v_y`` in
    [0.09, 0.1], each falling linearly to 0 0.01 outside; 0 outside the bands and where two cross.
    """

    def get_reward(self, physics: PointMassMazePhysics) -> float:
        (x, y), (vx, vy) = physics.position(), physics.velocity()
        up, right, left, down = (int(0.2 < c < 0.28) for c in (y, x, -x, -y))
        if up + right + left + down > 1:
            return 0.0
        return (up * _linear(vx, (-0.05, -0.04), margin=0.01)
                + right * _linear(vy, (0.09, 0.1), margin=0.01)
                + left * _linear(vy, (-0.1, -0.09), margin=0.01)
                + down * _linear(vx, (0.04, 0.05), margin=0.01))


# --- point_mass-easy_visible: the suite's point_mass-easy with the mass drawn larger ---------------------
# At 64x64 pixels the suite's point mass (radius 0.01 in a 0.6 m arena) covers about 2 pixels, too few for
# a pixel world model trained for minutes on a CPU to pick up (docs/bench_active_inference.md). This task
# draws it with radius VISIBLE_MASS_RADIUS. Only the picture changes: the model disables contacts, and the
# body's mass and inertia were fixed when the model compiled, so geom_size never enters the dynamics;
# the reward is the suite's (it reads the mass's position, not its size).
VISIBLE_MASS_RADIUS = 0.04


def _point_mass_visible_load(time_limit=None, random=None, environment_kwargs=None) -> control.Environment:
    from dm_control import suite

    task_kwargs = {"random": random}
    if time_limit is not None:
        task_kwargs["time_limit"] = time_limit
    env = suite.load("point_mass", "easy", task_kwargs=task_kwargs, environment_kwargs=environment_kwargs)
    model = env.physics.model
    model.geom_size[model.name2id("pointmass", "geom"), 0] = VISIBLE_MASS_RADIUS
    return env


# --- registry ---------------------------------------------------------------------------------------------


def _build_registry() -> dict[tuple[str, str], Callable[..., control.Environment]]:
    walker_load = functools.partial(_loader, _walker_physics, default_time_limit=_WALKER_TIME_LIMIT,
                                    control_timestep=_WALKER_CONTROL_TIMESTEP)
    cheetah_load = functools.partial(_loader, _cheetah_physics, default_time_limit=_CHEETAH_TIME_LIMIT)
    quadruped_load = functools.partial(_loader, _quadruped_physics, default_time_limit=_QUADRUPED_TIME_LIMIT,
                                       control_timestep=_QUADRUPED_CONTROL_TIMESTEP)
    maze_load = functools.partial(_loader, _maze_physics, default_time_limit=_MAZE_TIME_LIMIT)

    registry = {
        ("walker", "spin"): walker_load(WalkerSpin),
        ("walker", "flip"): walker_load(WalkerFlip),
        ("quadruped", "stand"): quadruped_load(QuadrupedStand),
        ("quadruped", "jump"): quadruped_load(QuadrupedJump),
    }
    cheetah_moves = {"walk": (_CHEETAH_WALK_SPEED, True), "walk_backward": (_CHEETAH_WALK_SPEED, False),
                     "run_backward": (_CHEETAH_RUN_SPEED, False)}
    for task, (speed, forward) in cheetah_moves.items():
        registry["cheetah", task] = cheetah_load(functools.partial(CheetahMove, speed, forward=forward))
    for corner in _MAZE_CORNERS:
        reach = functools.partial(PointMassMazeReach, corner)
        registry["point_mass_maze", f"reach_{corner}"] = maze_load(reach)
    registry["point_mass_maze", "reach_bottom_left_long"] = maze_load(PointMassMazeReachLong)
    registry["point_mass_maze", "loop"] = maze_load(PointMassMazeLoop)
    registry["point_mass_maze", "square"] = maze_load(PointMassMazeSquare)
    registry["point_mass_maze", "fast_slow"] = maze_load(PointMassMazeFastSlow)
    registry["point_mass", "easy_visible"] = _point_mass_visible_load
    return registry


CUSTOM_TASKS: dict[tuple[str, str], Callable[..., control.Environment]] = _build_registry()
