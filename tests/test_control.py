"""The robot control loop (control/): safety layer, fault handling, telemetry, recording, SimRobot, export.

Logic tests run a ``FakeRobot`` on a ``FakeClock`` with scripted policies (deterministic, no timing
assertions); the SimRobot tests run in real time on a loaded machine and assert counts and safety
invariants with generous timing bounds only.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from latentrl.control.fake import DEMO_CASES, FakeClock, FakeRobot, save_demo_model
from latentrl.control.loop import ControlLoop, SafetyConfig
from latentrl.control.recorder import Recorder
from latentrl.control.telemetry import Fault

RATE = 50.0
T = 1.0 / RATE


class ScriptedPolicy:
    """A policy whose action at its ``i``-th call is ``script(i)`` (a tensor, or an exception to raise); the
    carry counts calls since the last ``is_first``. Records every call's ``is_first`` and observation."""

    uses_autograd = False
    obs_key = "state"

    def __init__(self, script, action_dim: int = 2, clock: FakeClock | None = None, cost=None):
        self.script, self.action_dim, self.clock, self.cost = script, action_dim, clock, cost
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def init_carry(self, n: int) -> TensorDict:
        return TensorDict(count=torch.zeros(n, dtype=torch.int64), batch_size=[n])

    def step(self, obs, carry, is_first):
        i = len(self.calls)
        self.calls.append((bool(is_first[0]), obs["state"][0].clone()))
        if self.clock is not None and self.cost is not None:
            self.clock.advance(self.cost(i))
        out = self.script(i)
        if isinstance(out, BaseException):
            raise out
        count = torch.where(torch.as_tensor(is_first), 0, carry["count"]) + 1
        return torch.as_tensor(out, dtype=torch.float32).reshape(1, -1), TensorDict(count=count, batch_size=[1])


def constant(value):
    return lambda i: torch.full((2,), float(value))


def fake_loop(policy_script=None, *, robot=None, safety=None, cost=None, recorder=None, **kw):
    clock = FakeClock()
    robot = robot or FakeRobot(clock=clock)
    robot.clock = clock
    robot._now = clock.now
    policy = ScriptedPolicy(policy_script or constant(0.5), clock=clock, cost=cost)
    loop = ControlLoop(robot, policy, RATE, safety=safety or SafetyConfig(), clock=clock, recorder=recorder,
                       warmup=False, **kw)
    return loop, robot, policy, clock


def assert_all_sent_safe(robot: FakeRobot, low: float = -1.0, high: float = 1.0) -> None:
    assert robot.sent, "nothing was sent"
    sent = torch.stack(robot.sent)
    assert torch.isfinite(sent).all()
    assert (sent >= low).all() and (sent <= high).all()


def fault_ticks(tel, fault: Fault) -> list[int]:
    return [int(k) for k, f in zip(tel.column("k"), tel.column("fault"), strict=True) if f & int(fault)]


# ------------------------------------------------------------------------------------ safety layer


def test_nonfinite_actions_never_reach_the_robot():
    script = lambda i: torch.tensor([math.nan, 0.2]) if i == 3 else torch.tensor([math.inf, -math.inf]) \
        if i == 6 else torch.full((2,), 0.5)
    loop, robot, policy, _ = fake_loop(script)
    tel = loop.run(max_ticks=12)
    assert_all_sent_safe(robot)
    assert fault_ticks(tel, Fault.NONFINITE_ACTION) == [3, 6]
    for k in (3, 6):
        assert torch.equal(robot.sent[k], torch.zeros(2))  # the zero fallback
    assert torch.equal(robot.sent[4], torch.full((2,), 0.5))
    assert sum("NONFINITE_ACTION" in e for _, e in tel.events) == 2


def test_actions_are_clipped_and_the_applied_action_is_recorded(tmp_path):
    recorder = Recorder(tmp_path / "data", capacity=100)
    loop, robot, _, _ = fake_loop(lambda i: torch.tensor([3.0, -0.25]), recorder=recorder)
    tel = loop.run(max_ticks=6)
    assert all(torch.equal(a, torch.tensor([1.0, -0.25])) for a in robot.sent[:6])
    assert tel.column("clipped")[:6].all() and tel.summary()["clipped_pct"] == 100.0
    from latentrl.replay.buffer import ReplayBuffer

    buffer = ReplayBuffer.load(tmp_path / "data")
    ep = buffer.episode(int(buffer.episodes()["id"][0]))
    assert torch.allclose(ep["action"][:5], torch.tensor([1.0, -0.25]).expand(5, 2))
    assert torch.allclose(ep["control", "raw_action"][:5], torch.tensor([3.0, -0.25]).expand(5, 2))


def test_rate_limit_moves_at_most_max_delta_per_tick():
    script = lambda i: torch.full((2,), -1.0) if i < 12 else torch.full((2,), 1.0)
    loop, robot, _, _ = fake_loop(script, safety=SafetyConfig(max_delta=0.2))
    tel = loop.run(max_ticks=25)
    sent = torch.stack(robot.sent[:25])[:, 0]
    steps = sent[1:] - sent[:-1]
    assert steps.abs().max() <= 0.2 + 1e-6
    assert torch.allclose(sent[11], torch.tensor(-1.0))
    assert torch.allclose(sent[12:23], torch.linspace(-0.8, 1.0, 10).new_tensor(
        [-0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]), atol=1e-6)
    assert tel.column("rate_limited")[:25].sum() >= 14  # 0 -> -1 (5 ticks) and -1 -> +1 (9 ticks)


# --------------------------------------------------------------------------------- fault injection


def test_bad_observations_are_refused_before_the_policy():
    def hook(i, obs):
        if i == 2:
            obs["state"][1] = math.nan
        if i == 4:
            obs["state"][0] = math.inf
        if i == 6:
            obs["state"] = torch.zeros(3)
        if i == 8:
            obs["state"] = obs["state"].double()
        if i == 10:
            del obs["state"]
        return obs

    loop, robot, policy, _ = fake_loop(robot=FakeRobot(obs_hook=hook))
    tel = loop.run(max_ticks=14)
    assert fault_ticks(tel, Fault.BAD_OBS) == [2, 4, 6, 8, 10]
    assert len(policy.calls) == 14 - 5
    assert all(torch.isfinite(obs).all() and obs.shape == (4,) for _, obs in policy.calls)
    assert_all_sent_safe(robot)
    assert all(torch.equal(robot.sent[k], torch.zeros(2)) for k in (2, 4, 6, 8, 10))


def test_stale_and_dropped_observations_are_counted_and_held():
    def hook(i, obs):
        if i in (3, 4, 5):  # dropped frames: the robot keeps returning sample 2
            obs["seq"] = torch.tensor(2)
        if i == 9:  # a sample older than two periods
            obs["timestamp"] = obs["timestamp"] - 3 * T
        return obs

    loop, robot, policy, _ = fake_loop(lambda i: torch.full((2,), 0.1 * (i + 1)), robot=FakeRobot(obs_hook=hook))
    tel = loop.run(max_ticks=12)
    assert fault_ticks(tel, Fault.STALE_OBS) == [3, 4, 5, 9]
    assert len(policy.calls) == 12 - 4
    for k in (3, 4, 5):  # hold: the last sent action again
        assert torch.equal(robot.sent[k], robot.sent[2])
    assert tel.summary()["faults"]["STALE_OBS"] == 4


def test_policy_exceptions_fall_back_and_five_in_a_row_latch_the_estop():
    script = lambda i: RuntimeError("boom") if i == 2 or i >= 6 else torch.full((2,), 0.5)
    loop, robot, policy, _ = fake_loop(script)
    tel = loop.run(max_ticks=50)
    assert fault_ticks(tel, Fault.POLICY_ERROR) == [2, 6, 7, 8, 9, 10]
    assert fault_ticks(tel, Fault.ESTOP) == [11]  # category 1: the e-stop action once, then the run ends
    assert tel.n == 12 and "5 faulty ticks in a row" in tel.estop_reason
    assert not robot.is_connected and robot.disconnects == 1
    assert_all_sent_safe(robot)
    assert torch.equal(robot.sent[-1], torch.zeros(2))
    assert any("POLICY_ERROR" in e and "boom" in e for _, e in tel.events)


def test_a_policy_slower_than_the_period_misses_its_deadline_and_skips_ticks():
    cost = lambda i: 1.5 * T if i in (3, 7) else 0.001
    loop, robot, policy, clock = fake_loop(cost=cost)
    tel = loop.run(max_ticks=10)
    assert fault_ticks(tel, Fault.DEADLINE_MISS) == [3, 8]  # tick 4 and 8 were skipped: 7 ran as k=8
    assert tel.missed_ticks == 2
    assert torch.equal(robot.sent[3], torch.zeros(2))
    sched = tel.column("t_sched")
    assert np.all(np.diff(sched) >= T - 1e-9)  # never bursts: at most one send per period
    windows = np.floor((np.asarray(robot.sent_t[:-1]) - 1000.0) / T + 1e-9)  # the last send is the stop's
    assert np.all(np.diff(windows) >= 1)  # at most one send per period
    assert np.allclose(tel.column("lateness_ms"), 0.0)  # the loop kept its schedule


def test_a_robot_that_disconnects_is_counted_and_estops():
    loop, robot, policy, _ = fake_loop(robot=FakeRobot(disconnect_after=8))
    tel = loop.run(max_ticks=40)
    counts = tel.fault_counts()
    assert counts["OBS_ERROR"] == 5 and counts["SEND_ERROR"] == 6  # and the e-stop tick's send
    assert fault_ticks(tel, Fault.OBS_ERROR) == [7, 8, 9, 10, 11]  # lost at the 8th observation
    assert tel.estop_reason and "5 faulty ticks" in tel.estop_reason
    assert np.allclose(tel.column("lateness_ms"), 0.0)
    assert_all_sent_safe(robot)
    assert len(robot.sent) == 7  # nothing reached a disconnected robot


def test_estop_from_another_thread_latches_and_resume_restarts_the_policy():
    events = {}

    class Clock(FakeClock):
        def sleep_until(self, t):
            super().sleep_until(t)
            k = round((t - self.start) / T)
            if k == 5:
                th = threading.Thread(target=loop.estop, args=("operator",))
                th.start()
                th.join()
            if k == 9:
                loop.reset_estop()
                events["calls_at_reset"] = len(policy.calls)
            if k == 12:
                loop.resume()

    clock = Clock()
    clock.start = clock.t
    robot = FakeRobot(clock=clock)
    policy = ScriptedPolicy(constant(0.5))
    loop = ControlLoop(robot, policy, RATE, safety=SafetyConfig(estop_category=2, estop_action=(0.0, -0.5)),
                       clock=clock, warmup=False)
    tel = loop.run(max_ticks=16)
    assert fault_ticks(tel, Fault.ESTOP) == [5, 6, 7, 8, 9, 10, 11]
    assert len(policy.calls) == 5 + 4 and events["calls_at_reset"] == 5  # none while stopped
    assert all(torch.equal(robot.sent[k], torch.tensor([0.0, -0.5])) for k in range(5, 12))
    firsts = [first for first, _ in policy.calls]
    assert firsts == [True, False, False, False, False, True, False, False, False]


def test_keyboard_interrupt_stops_safely_and_writes_everything(tmp_path):
    script = lambda i: KeyboardInterrupt() if i == 6 else torch.full((2,), 0.7)
    recorder = Recorder(tmp_path / "data", capacity=100)
    loop, robot, _, _ = fake_loop(script, recorder=recorder, out_dir=tmp_path / "tel")
    tel = loop.run(max_ticks=100)
    assert not robot.is_connected
    assert torch.equal(robot.sent[-1], torch.zeros(2))
    assert "KeyboardInterrupt" in tel.estop_reason
    assert (tmp_path / "tel" / "telemetry.csv").exists()
    summary = json.loads((tmp_path / "tel" / "telemetry.json").read_text())["summary"]
    assert summary["estop"].startswith("KeyboardInterrupt")
    from latentrl.replay.buffer import ReplayBuffer

    assert len(ReplayBuffer.load(tmp_path / "data")) == 5


def test_telemetry_percentiles_and_counts_match_the_injected_timings(tmp_path):
    rng = np.random.default_rng(0)
    costs = rng.uniform(0.001, 0.012, size=200)
    script = lambda i: torch.tensor([math.nan, 0.0]) if i % 50 == 7 else torch.full((2,), 0.1)
    loop, robot, policy, _ = fake_loop(script, cost=lambda i: float(costs[i]), out_dir=tmp_path)
    tel = loop.run(max_ticks=200)
    summary = tel.summary()
    infer = costs[1:200] * 1e3
    assert summary["infer_ms"]["p50"] == pytest.approx(np.percentile(infer, 50), abs=1e-6)
    assert summary["infer_ms"]["p99"] == pytest.approx(np.percentile(infer, 99), abs=1e-6)
    assert summary["faults"]["NONFINITE_ACTION"] == 4
    rows = (tmp_path / "telemetry.csv").read_text().splitlines()
    assert len(rows) == 201 and "infer_ms" in rows[0]


def test_tensorboard_gets_the_latencies(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    loop, *_ = fake_loop(out_dir=tmp_path, logger=writer)
    loop.run(max_ticks=20)
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "control/loop_latency_ms" in acc.Tags()["scalars"]
    assert len(acc.Scalars("control/loop_latency_ms")) == 20


def test_real_clock_slow_policy_keeps_the_rate():
    """Real time: a policy that sometimes takes 1.5 periods; the loop sends at most once per period, keeps
    its schedule, and counts each miss (generous bounds: the machine is shared)."""
    import time

    class Slow(ScriptedPolicy):
        def step(self, obs, carry, is_first):
            if len(self.calls) % 10 == 5:
                time.sleep(1.5 * T)
            return super().step(obs, carry, is_first)

    robot = FakeRobot()
    policy = Slow(constant(0.3))
    loop = ControlLoop(robot, policy, RATE, warmup=False)
    tel = loop.run(duration_s=1.0)
    assert_all_sent_safe(robot)
    windows = np.floor((np.asarray(robot.sent_t[:-1]) - tel.column("t_sched")[0]) / T)
    assert np.all(np.diff(windows) >= 1)  # at most one send per period (the last send is the stop's)
    misses = tel.fault_counts()["DEADLINE_MISS"]
    assert 3 <= misses <= 6 and tel.missed_ticks >= misses
    assert 30 <= tel.n <= 51


# ---------------------------------------------------------------------------------- model dirs, sim

AGENT_CASES = list(DEMO_CASES)


def build_policy_model(case: str, root: Path) -> Path:
    """A smoke-preset pixel agent of ``case`` saved as a model directory (with its task)."""
    return save_demo_model(case, root)


class RecordingRobot:
    """A transparent proxy that keeps every action a robot applied."""

    def __init__(self, robot):
        self._robot, self.sent = robot, []

    def __getattr__(self, name):
        return getattr(self._robot, name)

    @property
    def is_connected(self):
        return self._robot.is_connected

    def send_action(self, action):
        applied = self._robot.send_action(action)
        self.sent.append(applied.clone())
        return applied


@pytest.fixture(scope="module")
def sim_robot():
    from latentrl.control.sim import SimRobot

    # a 2 s watchdog: between the loops below nothing is sent while the next model is built (recover() re-arms)
    robot = SimRobot("reacher-easy", image_size=64, seed=0, action_timeout_s=2.0)
    robot.connect()
    yield robot
    robot.disconnect()


def test_every_agent_drives_sim_robot_at_50hz_from_a_model_dir(sim_robot, tmp_path):
    from latentrl import load_policy

    report, sent_by_case = {}, {}
    for case in AGENT_CASES:
        policy = load_policy(build_policy_model(case, tmp_path))
        robot = RecordingRobot(sim_robot)
        recorder = Recorder(tmp_path / f"data-{case}", capacity=200, domain="reacher") if case == "rnd" else None
        sim_robot.recover()
        # no e-stop latch here: on a loaded 2-core machine a few late ticks in a row would end the run early
        loop = ControlLoop(robot, policy, 50.0, disconnect=False, recorder=recorder,
                           safety=SafetyConfig(max_consecutive_faults=0))
        tel = loop.run(max_ticks=40)
        counts = tel.fault_counts()
        report[case] = (tel.summary()["achieved_hz"], counts, loop.policy_calls)
        sent = torch.stack(robot.sent)
        sent_by_case[case] = sent
        assert torch.isfinite(sent).all() and sent.abs().max() <= 1.0, case
        assert tel.n == 40, case
        assert counts["POLICY_ERROR"] == counts["BAD_OBS"] == counts["OBS_ERROR"] == counts["SEND_ERROR"] == 0, case
        assert loop.policy_calls >= 15, (case, counts)  # the policy acted on most ticks
        assert 20.0 <= tel.summary()["achieved_hz"] <= 52.0, (case, report[case])
        if case != "active_inference":  # its planner may exceed the 16 ms deadline on a shared CPU
            assert (sent.abs() > 0).any(), case
    assert sim_robot.is_connected and sim_robot.stats()["fault"] == 0
    # the recorded RND steps are a dataset that loads and whose next states are the following states
    from latentrl.envs import get_task
    from latentrl.replay.buffer import ReplayBuffer

    buffer = ReplayBuffer.load(tmp_path / "data-rnd")
    ep = buffer.episode(int(buffer.episodes()["id"][0]))
    assert ep["pixels"].shape[1:] == (3, 64, 64) and ep["physics"].dtype == torch.float64
    rows = len(ep) - 1  # the last row holds only the final observation
    assert buffer.domain == "reacher" and rows >= 30
    torch.testing.assert_close(ep["action"][:rows], sent_by_case["rnd"][:rows])  # one row per tick, in order
    torch.testing.assert_close(ep["state"][:, :2], ep["physics"][:, :2].float())  # reacher: state = (qpos, to_target,
    torch.testing.assert_close(ep["state"][:, 4:], ep["physics"][:, 2:4].float())  # qvel) of the same physics
    assert torch.equal(ep["step"], torch.arange(len(ep)))
    # the recorded reward is the task's reward of the next physics state (seed 0: the relabel env's target)
    td = TensorDict({"next": {"physics": ep["physics"][1:].clone()}}, batch_size=[rows])
    relabelled = ReplayBuffer.relabel(get_task("reacher-easy"), td)
    torch.testing.assert_close(relabelled["next", "reward"].reshape(-1), ep["next", "reward"][:rows].reshape(-1))


def test_export_script_writes_and_checks_an_onnx_policy(tmp_path, capsys):
    from latentrl.control.cli import UsageError, export_main

    model = build_policy_model("td_jepa_reward", tmp_path)
    meta = export_main([f"model={model}", "format=onnx", "check=true"])
    assert meta["check"]["onnx"]["action"] < 1e-5 and (model / "export" / "policy.onnx").exists()
    assert json.loads((model / "export" / "export.json").read_text())["check"]["onnx"]["carry"] < 1e-5
    with pytest.raises(UsageError, match="Did you mean format"):
        export_main([f"model={model}", "formt=onnx"])
    with pytest.raises(SystemExit) as stop:  # a planner says why and exits with status 2
        export_main([f"model={build_policy_model('active_inference', tmp_path)}"])
    assert stop.value.code == 2 and "plans at every step" in capsys.readouterr().err


@pytest.mark.slow
def test_run_control_loop_script_on_sim_with_onnx_backend(tmp_path):
    from latentrl.control.cli import export_main, run_main

    model = build_policy_model("td_jepa_reward", tmp_path)
    export_main([f"model={model}", "format=onnx", "check=false"])
    summary = run_main([f"model={model}", "robot=sim", "rate=50", "duration=1.5", "backend=onnx", f"out={tmp_path}/run",
                        f"record={tmp_path}/rec", "status=false"])
    assert summary["ticks"] >= 40
    assert summary["faults"]["POLICY_ERROR"] == summary["faults"]["BAD_OBS"] == 0
    assert (tmp_path / "run" / "telemetry.csv").exists() and list((tmp_path / "run" / "tb").iterdir())
    from latentrl.replay.buffer import ReplayBuffer

    assert len(ReplayBuffer.load(tmp_path / "rec")) >= 30


@pytest.mark.slow
def test_sim_robot_latency_drops_and_watchdog():
    import time

    from latentrl.control.robot import RobotFaultError
    from latentrl.control.sim import LatencyModel, SimRobot

    robot = SimRobot("reacher-easy", image_size=0, latency=LatencyModel(obs_ms=30, obs_drop_prob=0.2), seed=3)
    robot.connect()
    try:
        policy = ScriptedPolicy(constant(0.2))
        loop = ControlLoop(robot, policy, robot.rate_hz, disconnect=False, warmup=False,
                           safety=SafetyConfig(max_obs_age_s=0.2, max_consecutive_faults=0))
        tel = loop.run(max_ticks=300)
        age = np.nanmedian(tel.column("obs_age_ms")[1:])
        assert abs(age - 30.0) <= 1e3 / robot.rate_hz + 5  # 30 ms +/- a period
        stale = tel.fault_counts()["STALE_OBS"] / tel.n
        n, p = tel.n, 0.2
        assert abs(stale - p) <= 2.6 * math.sqrt(p * (1 - p) / n) + 0.08  # binomial band, phase slips on top
        stats = robot.stats()
        assert abs(stats["sim_time"] - stats["wall_time"]) < 0.02 * stats["wall_time"] + 0.1
        time.sleep(0.3)  # no actions: the watchdog zeroes the control and latches
        assert robot.stats()["fault"] == 1 and np.all(robot.stats()["ctrl"] == 0)
        with pytest.raises(RobotFaultError):
            robot.get_observation()
    finally:
        robot.disconnect()


# ------------------------------------------------------------------------------------------ export

# metra_skill and fb_reward share their policy classes with metra_goal and td_jepa_reward (about 10 s each here)
EXPORT_CASES = ["rnd", pytest.param("metra_skill", marks=pytest.mark.slow), "metra_goal", "td_jepa_reward",
                pytest.param("fb_reward", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_onnx_export_matches_pytorch_over_500_steps_with_its_carry(case, tmp_path):
    import onnx

    from latentrl import load_policy
    from latentrl.control.export import OnnxPolicy, carry_keys, export_policy

    model = build_policy_model(case, tmp_path)
    policy = load_policy(model)
    meta = export_policy(model, formats=("onnx",))
    folder = model / "export"
    onnx.checker.check_model(str(folder / "policy.onnx"))
    graph = onnx.load(str(folder / "policy.onnx")).graph
    assert [i.name for i in graph.input] == [i["name"] for i in meta["inputs"]]
    assert [o.name for o in graph.output] == [o["name"] for o in meta["outputs"]]
    assert any(i["name"].startswith("carry.frames") for i in meta["inputs"])
    exported = OnnxPolicy(folder)
    g = torch.Generator().manual_seed(0)
    carry, ex_carry = policy.init_carry(1), exported.init_carry(1)
    frame = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=g)
    worst = 0.0
    for t in range(500):
        first = torch.tensor([t in (0, 250)])
        obs = TensorDict(pixels=frame, batch_size=[1])
        with torch.inference_mode():
            action, carry = policy.step(obs, carry, first)
        ex_action, ex_carry = exported.step(obs, ex_carry, first)
        worst = max(worst, float((action - ex_action).abs().max()))
        for key in carry_keys(carry):
            if carry[key].dtype == torch.uint8:
                assert torch.equal(carry[key], ex_carry[key]), (t, key)
            else:
                torch.testing.assert_close(ex_carry[key], carry[key], atol=1e-5, rtol=1e-4)
        # closed loop: the next frame depends on the action taken
        shift = int((action[0, 0] * 3).round())
        frame = torch.roll(frame, shifts=shift + 1, dims=-1) ^ torch.randint(0, 8, frame.shape, dtype=torch.uint8,
                                                                            generator=g)
    assert worst <= 1e-5, worst
    # a garbage carry with is_first gives the fresh carry's action; batches of 3 restart row by row
    garbage = exported.init_carry(3).apply(lambda x: torch.randint_like(x, 0, 200) if x.dtype == torch.uint8
                                           else (torch.rand_like(x.float()) * 100).to(x.dtype))
    obs = TensorDict(pixels=torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=g), batch_size=[3])
    first = torch.tensor([True, False, True])
    with torch.inference_mode():
        ref, _ = policy.step(obs, garbage, first)
        fresh, _ = policy.step(obs, policy.init_carry(3), torch.ones(3, dtype=torch.bool))
    ex, _ = exported.step(obs, garbage, first)
    torch.testing.assert_close(ex, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ex[[0, 2]], fresh[[0, 2]], atol=1e-5, rtol=1e-4)


def test_torch_export_matches_pytorch(tmp_path):
    from latentrl import load_policy
    from latentrl.control.export import TorchExportPolicy, export_policy, parity_check

    model = build_policy_model("metra_goal", tmp_path)
    meta = export_policy(model, formats=("torch_export",))
    err = parity_check(load_policy(model), TorchExportPolicy(model / "export"), meta, steps=60)
    assert err["action"] <= 1e-5 and err["carry"] <= 1e-5


def test_unexportable_policies_say_why(tmp_path):
    from latentrl import load_policy
    from latentrl.control.export import PolicyNotExportableError, export_policy

    with pytest.raises(PolicyNotExportableError, match="plans at every step"):
        export_policy(build_policy_model("active_inference", tmp_path), formats=("onnx",))
    prior = load_policy(build_policy_model("rnd", tmp_path))  # deterministic: exportable
    metra = build_policy_model("metra_skill", tmp_path)
    config = json.loads((metra / "config.json").read_text())
    config["task"] = None
    (metra / "config.json").write_text(json.dumps(config))  # no task: METRA draws skills from the prior
    with pytest.raises(PolicyNotExportableError, match="at random at each episode's start"):
        export_policy(metra, formats=("onnx",))
    prior.uses_autograd = True
    with pytest.raises(PolicyNotExportableError, match="autograd"):
        export_policy(prior, tmp_path / "x", formats=("onnx",))


def test_a_lerobot_style_robot_fits_through_the_adapter():
    """A robot in LeRobot's vocabulary (raw ``<motor>.pos`` keys, ``HxWx3`` camera, dict actions) runs in the loop."""
    from latentrl.control.robot import LeRobotAdapter

    class LeRobotLike:
        name = "so_follower_like"
        observation_features = {"shoulder_pan.pos": float, "gripper.pos": float, "front": (8, 8, 3)}

        def __init__(self):
            self.is_connected, self.pos, self.sent = False, {"shoulder_pan.pos": 0.0, "gripper.pos": 10.0}, []

        def connect(self, calibrate=True):
            self.is_connected = True

        def get_observation(self):
            return {**self.pos, "front": np.full((8, 8, 3), 7, dtype=np.uint8)}

        def send_action(self, action):
            applied = dict(action)
            applied["gripper.pos"] = min(applied["gripper.pos"], 60.0)  # a robot-side limit
            self.sent.append(applied)
            self.pos = applied
            return applied

        def disconnect(self):
            self.is_connected = False

    raw = LeRobotLike()
    robot = LeRobotAdapter(raw, ["shoulder_pan", "gripper"], {"shoulder_pan": (-90, 90), "gripper": (0, 100)},
                           camera="front")
    assert robot.observation_features["pixels"].shape == (3, 8, 8)

    class PixelPolicy(ScriptedPolicy):
        obs_key = "pixels"

        def step(self, obs, carry, is_first):
            assert obs["pixels"].shape == (1, 3, 8, 8) and obs["pixels"].dtype == torch.uint8
            obs = TensorDict(state=obs["pixels"].float().mean((-1, -2)), batch_size=[1])
            return super().step(obs, carry, is_first)

    policy = PixelPolicy(constant(0.5))
    tel = ControlLoop(robot, policy, RATE, warmup=False).run(max_ticks=10)
    assert len(policy.calls) >= 5 and tel.fault_counts()["BAD_OBS"] == 0
    # 0.5 -> 45 degrees and 75 % gripper, which the robot limits to 60; faults and the stop hold (position targets)
    assert raw.sent and all(s == {"shoulder_pan.pos": 45.0, "gripper.pos": 60.0} for s in raw.sent)
    applied = robot.send_action(torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(applied, torch.tensor([0.5, 0.2]))  # the robot's limit, mapped back to [-1, 1]


def test_bench_control_report_from_faked_measurements(tmp_path):
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "bench_control.py"
    spec = importlib.util.spec_from_file_location("bench_control", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stats = {"p50": 1.0, "p90": 2.0, "p99": 3.0, "max": 4.0, "mean": 1.5, "over_budget_pct": 0.0, "calls": 10}
    latency = [{"agent": "rnd", "preset": "paper", "backend": "onnxruntime", "threads": 1, **stats},
               {"agent": "active_inference", "preset": "paper", "backend": "not exportable", "threads": None,
                "reason": "it plans at every step"}]
    per_stage = {"p50": 1.0, "p99": 2.0, "max": 3.0, "mean": 1.2}
    loop = [{"rate_hz": 50.0, "backend": "eager", "ticks": 100, "achieved_hz": 49.5, "lateness": per_stage,
             "loop_latency": per_stage, "infer": per_stage, "sensor_to_actuation": per_stage, "obs_age": per_stage,
             "missed_ticks": 1, "deadline_misses": 2, "faults": {"STALE_OBS": 3}, "lateness_samples": [0.1, 0.5, 2.0]}]
    header = {"args": "calls=10", "cpu": "cpu", "cores": 2, "load_start": "1", "load_end": "1", "load_note": "idle",
              "versions": "v", "omp": "1", "date": "today", "notes": ["a note"]}
    bench.write_report(tmp_path, latency, loop, header)
    text = (tmp_path / "bench_control.md").read_text()
    assert "| rnd | paper | onnxruntime | 1 | 1.000 | 3.000 | 4.00 | 0.0 |" in text
    assert "not exportable: it plans at every step" in text and "| 50 Hz | eager | 100 | 49.50 |" in text
    assert json.loads((tmp_path / "bench_control" / "results.json").read_text())["loop"][0]["missed_ticks"] == 1
    assert (tmp_path / "bench_control" / "lateness_cdf.png").exists() and "a note" in text
