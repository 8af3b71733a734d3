"""The online loop's GPU path (issue 19): MuJoCo Warp envs, the replay buffer's rows on the env's device, and no
host read per env step (``collector.inline_steps`` > 1, ``buffer_device``).

No GPU is needed for most of it: the same code runs on the CPU (MuJoCo Warp through Warp's CPU backend, the
buffer's ``storage_device="cpu"`` path), and the tests show

- the staged, sync-free loop writes exactly the steps, episodes and resets of the per-step loop;
- between two buffer writes, neither latentrl's code nor TorchRL's reads a tensor on the host (counted);
- the env's deferred checks (non-finite actions, diverged physics) raise at the next write, naming the worlds;
- a policy's sync-free restart gives the per-step restart's actions and carries;
- the buffer's separate storage-device path samples, checkpoints and saves what the host storage does.

The last test runs on a GPU only: ``torch.cuda.set_sync_debug_mode("error")`` around the loop's steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from test_learner_speed import HostReads
from test_training import SMOKE

from latentrl.replay import ReplayBuffer
from latentrl.training.cli import load_config
from latentrl.training.trainer import Trainer

pytest.importorskip("mujoco_warp")

LOOP = [*SMOKE, "agent=rnd", "env=cheetah-run", "env.backend=mjwarp", "env.obs=[state,physics]", "env.num_envs=2",
        "env.episode_length=6", "eval.at_end=false", "checkpoint_every=0"]
# the host reads that stall a GPU stream (on the CPU they are free, so they are counted instead)
SYNCS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")


def _trainer(tmp_path, *overrides: str, device: str = "cpu") -> Trainer:
    cfg = load_config([*LOOP, f"device={device}", f"run_dir={tmp_path}", *overrides])
    return Trainer(cfg, tmp_path)


def _run(trainer: Trainer, steps: int) -> Trainer:
    loop = trainer._online_steps()
    for _ in range(steps):
        next(loop)
    trainer.save()  # writes the steps still kept on the env's device first
    return trainer


def _stored(buffer: ReplayBuffer) -> dict:
    episodes = buffer.episodes()
    rows = {int(i): buffer.episode(int(i)) for i in episodes["id"]}
    return {"episodes": episodes, "rows": rows, "len": len(buffer)}


def test_staged_sync_free_loop_stores_what_the_per_step_loop_stores(tmp_path):
    """14 steps of 2 envs with 6-step episodes (resets at steps 6 and 12), no updates: the steps written 4 at a
    time with no host read per step equal those written one by one (RND's policy draws nothing at restarts), and
    a checkpoint holds the 2 steps not yet written."""
    runs = {}
    for inline_steps in (1, 4):
        trainer = _trainer(tmp_path / str(inline_steps), f"collector.inline_steps={inline_steps}",
                           "learning_starts=1000")
        torch.manual_seed(0)
        runs[inline_steps] = _run(trainer, 14)
        assert trainer.env.sync_free == (inline_steps > 1) and trainer.inline_steps == inline_steps
    one, four = _stored(runs[1].buffer), _stored(runs[4].buffer)
    assert runs[1].episodes == runs[4].episodes == 4  # 2 envs x episodes ending at steps 6 and 12
    assert one["len"] == four["len"] == 28
    assert torch.equal(one["episodes"]["length"], four["episodes"]["length"])
    assert one["rows"].keys() == four["rows"].keys()
    for i, rows in one["rows"].items():  # exactly (a final row's reward is NaN in both)
        for key, value in rows.items(include_nested=True, leaves_only=True):
            torch.testing.assert_close(value, four["rows"][i][key], rtol=0, atol=0, equal_nan=True,
                                       msg=f"episode {i}: {key}")
    assert runs[4].env._host_steps.tolist() == runs[4].env._step_count.tolist()  # the host's count is the env's
    for t in runs.values():
        t.env.close()


def test_sync_free_loop_reads_nothing_on_the_host_between_buffer_writes(tmp_path, monkeypatch):
    """Every host read of the loop's 12 steps (with updates) happens inside a buffer write (one per 4 steps) or
    an episode's reset (the host draws its initial states); none comes from the policy, the env's step, TorchRL's
    step or the trainer in between."""
    trainer = _trainer(tmp_path, "collector.inline_steps=4", "learning_starts=8", "updates_per_step=0.5")
    loop = trainer._online_steps()
    for _ in range(8):  # the first write and the first updates (the agent's lazy setup reads once)
        next(loop)
    original, flushes = Trainer._flush_stage, []

    def counted_flush(self):
        reads.paused = True
        try:
            original(self)
        finally:
            reads.paused = False
        flushes.append(len(self.buffer))

    monkeypatch.setattr(Trainer, "_flush_stage", counted_flush)
    env_reset, resets = type(trainer.env).reset, []

    def counted_reset(self, *args, **kwargs):  # once per episode (the host draws its initial states): not counted
        reads.paused = True
        try:
            return env_reset(self, *args, **kwargs)
        finally:
            reads.paused = False
            resets.append(self._host_steps.tolist())

    monkeypatch.setattr(type(trainer.env), "reset", counted_reset)
    updates = trainer.updates
    with HostReads(skip=[trainer.agent.env_steps_counter], names=SYNCS, libraries=("torchrl", "tensordict")) as reads:
        for _ in range(12):
            next(loop)
    assert len(flushes) == 3 and trainer.updates > updates  # the steps crossed 3 writes and made updates
    assert resets == [[0, 0], [0, 0]]  # at steps 12 and 18: two episode ends, each one reset of both worlds
    assert reads.calls == [], "\n".join(reads.calls)
    trainer.env.close()


def test_sync_free_env_defers_its_checks_to_the_next_write(tmp_path):
    from latentrl.envs import make_env
    from latentrl.envs.mjwarp import PhysicsDivergedError

    env = make_env("cheetah-run", backend="mjwarp", obs=("physics",), num_envs=2, seed=0)
    env.sync_free = True
    td = env.reset()
    action = torch.zeros(2, env.action_spec.shape[-1])
    action[1, 2] = float("nan")
    td["action"] = action
    td, _ = env.step_and_maybe_reset(td)  # no raise at the step ...
    assert torch.equal(td["action"][1], torch.zeros_like(td["action"][1]))  # ... the world ran a zero action
    with pytest.raises(ValueError, match=r"non-finite actions .* env rows \[1\]"):
        env.check_deferred()
    env.check_deferred()  # counted once: the next check starts afresh
    td = env.reset()
    env._view.qvel[0] = float("nan")  # world 0's physics diverges at its next step
    td["action"] = torch.zeros(2, env.action_spec.shape[-1])
    td, _ = env.step_and_maybe_reset(td)
    assert bool(td["next", "terminated"][0])
    with pytest.raises(PhysicsDivergedError, match=r"worlds \[0\] diverged.*inline_steps=1"):
        env.check_deferred()
    env.close()


def test_sync_free_restart_gives_the_per_step_restart(tmp_path):
    """A frame-stacked pixel policy (RND's, which draws nothing at restarts) over steps with random restarts: the
    same actions and carries either way."""
    from latentrl.agents import make_agent
    from latentrl.envs import make_env

    env = make_env("cheetah-run", obs=("pixels",), num_envs=3, num_workers=0)
    agent = make_agent("rnd", env, preset="smoke", obs_type="pixels")
    env.close()
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 255, (6, 3, 3, 64, 64), dtype=torch.uint8, generator=generator)
    restarts = torch.rand(6, 3, generator=generator) < 0.4
    restarts[0] = True
    out = {}
    for sync_free in (False, True):
        policy = agent.policy(explore=False)
        policy.sync_free = sync_free
        carry, actions = policy.init_carry(3), []
        for t in range(6):
            action, carry = policy.step(TensorDict(pixels=frames[t], batch_size=[3]), carry, restarts[t])
            actions.append(action)
        out[sync_free] = torch.stack(actions), carry
    assert torch.equal(out[False][0], out[True][0])
    assert (out[False][1] == out[True][1]).all()


def test_buffer_rows_on_a_storage_device_sample_and_checkpoint_as_on_the_host(tmp_path):
    """``storage_device`` keeps the rows apart from the bookkeeping (on the GPU in the trainer's GPU loop); on the
    CPU the same code path must give the host storage's samples, checkpoints and datasets."""
    generator = torch.Generator().manual_seed(0)

    def steps(t0: int) -> TensorDict:
        e, t = 2, 5
        pixels = torch.randint(0, 255, (e, t, 3, 8, 8), dtype=torch.uint8, generator=generator)
        done = torch.zeros(e, t, 1, dtype=torch.bool)
        done[:, -1] = t0 % 2 == 1
        return TensorDict({
            "pixels": pixels, "action": torch.randn(e, t, 2, generator=generator),
            "next": {"pixels": pixels.roll(-1, 1), "reward": torch.randn(e, t, 1, generator=generator),
                     "done": done, "terminated": torch.zeros_like(done), "truncated": done.clone()},
        }, batch_size=[e, t])

    host, apart = ReplayBuffer(60), ReplayBuffer(60, storage_device="cpu")
    for t0 in range(8):  # past the capacity: the rings wrap
        td = steps(t0)
        host.extend(td.clone())
        apart.extend(td.clone())
    restored = ReplayBuffer(60, storage_device="cpu")
    restored.load_state_dict(apart.state_dict())
    apart.save(tmp_path / "data")
    loaded = ReplayBuffer.load(tmp_path / "data")
    for kwargs in ({"frame_stack": 2, "horizon": 3}, {"offset": 2}, {"goal": "future"}):
        samples = []
        for buffer in (host, apart, restored, loaded):
            torch.manual_seed(1)
            samples.append(buffer.sample(16, **kwargs))
        assert all((samples[0] == s).all() for s in samples[1:]), kwargs
    with pytest.raises(ValueError, match="in-memory"):
        ReplayBuffer(60, path=tmp_path / "disk", storage_device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_loop_makes_no_host_sync_between_buffer_writes(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "learning_starts=8", "updates_per_step=0.5", device="cuda")
    assert trainer.inline_steps == 16 and trainer.buffer.storage_device.type == "cuda"
    loop = trainer._online_steps()
    for _ in range(16):
        next(loop)
    def allowed(fn):  # the buffer writes and the episodes' resets read on the host
        def call(*args, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return call

    monkeypatch.setattr(Trainer, "_flush_stage", allowed(Trainer._flush_stage))
    monkeypatch.setattr(type(trainer.env), "reset", allowed(type(trainer.env).reset))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(32):
            next(loop)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    trainer.env.close()


def test_bench_online_loop_runs_both_loops_and_writes_the_page(tmp_path, monkeypatch):
    """The benchmark's harness on the CPU (tiny): both loops, the profile rows, the same frames and updates; the
    trainers' run folders are removed afterwards."""
    import json
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_online_loop

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    out, results = tmp_path / "page.md", tmp_path / "results.json"
    bench_online_loop.main(["--agent", "rnd", "--preset", "smoke", "--num-envs", "2", "--steps", "8", "--block", "4",
                            "--learning-starts", "8", "--updates-per-step", "0.5", "--buffer-capacity", "2000",
                            "--override", "env.obs=[state,physics]", "--json", str(results), "--out", str(out)])
    rows = json.loads(results.read_text())["rows"]
    assert [(r["variant"], r["profile"]) for r in rows] == [("per_step", False), ("per_step", True),
                                                            ("staged", False), ("staged", True)]
    assert all(r["env_steps"] == 16 and r["updates"] == 8 and r["frames_per_s"] > 0 for r in rows)
    assert all(set(r["parts_s"]) == {"policy", "env", "write", "update"} for r in rows if r["profile"])
    assert [r["inline_steps"] for r in rows] == [1, 1, 16, 16]
    page = out.read_text()
    assert "| staged | 16 | cpu |" in page and "| per_step (profile) | 1 | cpu |" in page
    assert not any(p.name.startswith("bench_online_") for p in scratch.iterdir())
