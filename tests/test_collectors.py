"""TorchRL's collectors as the trainer's collection engine (training/collectors.py): the policy's carry
survives the collector's step bookkeeping, the batches reach the replay buffer as whole episodes, weights
reach the worker processes, and ``train_agent.py collector.kind=multisync`` trains and resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrl.envs.utils import step_mdp

from latentrl.agents import make_agent
from latentrl.envs import make_env
from latentrl.replay import ReplayBuffer
from latentrl.training.cli import ConfigError, load_config, train_main
from latentrl.training.collectors import CarryPolicyModule, collector_env, make_collector, replay_steps

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(task="cheetah-run", obs=("physics",), num_envs=2, num_workers=0, episode_length=12)


def _metra():
    env = make_env(**ENV)
    try:
        return make_agent("metra", env, preset="smoke", obs_type="physics")
    finally:
        env.close()


def _skills_per_episode(buffer: ReplayBuffer) -> list[int]:
    """How many distinct skills each stored episode holds (METRA's skill is drawn once per episode)."""
    counts = []
    for row in buffer.episodes().unbind(0):
        episode = buffer.episode(int(row["id"]), keys=("physics",))
        skills = episode["skill"][episode["has_action"]]  # the final row holds no transition
        counts.append(int(torch.unique(skills, dim=0).shape[0]))
    return counts


def test_carry_persists_within_episodes_and_restarts_at_each_episode():
    """METRA's skill lives in the carry: one skill per episode, a new one at each episode start. Without the
    carry primer (or with is_first ignored) the skill changes every step or never."""
    agent = _metra()
    collector = make_collector("sync", ENV, agent.policy(explore=True), ("physics",), steps_per_batch=12,
                               total_frames=2 * 12 * 3)
    buffer = ReplayBuffer(1000)
    try:
        for batch in collector:
            assert batch.batch_size == (2, 12)
            steps = replay_steps(batch)
            assert "carry" not in steps.keys() and "is_init" not in steps.keys()
            buffer.extend(steps)
    finally:
        collector.shutdown()
    assert buffer.num_episodes == 6 and len(buffer) == 72
    assert _skills_per_episode(buffer) == [1] * 6
    skills = torch.stack([buffer.episode(int(i), keys=("physics",))["skill"][0] for i in buffer.episodes()["id"]])
    assert torch.unique(skills, dim=0).shape[0] == 6  # each episode drew its own


def test_policy_module_restarts_rows_marked_is_init():
    agent = _metra()
    policy = agent.policy(explore=True)
    module = CarryPolicyModule(policy, ("physics",))
    env = collector_env(ENV, policy.init_carry(1)[0])
    try:
        td = module(env.reset())
        assert td["is_init"].all()
        first = td["next", "carry", "skill"].clone()
        td = step_mdp(env.step(td))
        assert torch.equal(td["carry", "skill"], first)  # the primer carried it to the next step
        td["is_init"] = torch.tensor([[True], [False]])
        td = module(td)
        kept, drawn = td["next", "carry", "skill"]
        assert torch.equal(drawn, first[1]) and not torch.equal(kept, first[0])
    finally:
        env.close()


def _two_batches_then_a_zeroed_actor(agent, collector) -> tuple[ReplayBuffer, list[float]]:
    """Collect 2 batches of ``[2 workers x 2 envs, 12]`` into a buffer; after the first, zero the actor's head and
    send the weights (``update_policy_weights_``). Returns the buffer and each batch's largest |action|."""
    buffer, actions = ReplayBuffer(1000), []
    try:
        for i, batch in enumerate(collector):
            steps = replay_steps(batch)
            assert steps.batch_size == (4, 12)
            buffer.extend(steps)
            actions.append(steps["action"].abs().max().item())
            if i == 0:
                with torch.no_grad():
                    for p in agent.actor.head.parameters():
                        p.zero_()
                collector.update_policy_weights_()
            if i == 1:
                break
    finally:
        collector.shutdown()
    return buffer, actions


def test_multisync_workers_fill_the_buffer_and_receive_new_weights():
    """Two collector processes: each batch holds both workers' envs as separate streams, and the workers act
    with the learner's current weights (a zeroed actor's mean action is 0). On the CPU TorchRL keeps the policy's
    weights in shared memory, so they arrive even without ``update_policy_weights_``, which copies them where
    they are not shared (GPU, Ray)."""
    agent = _metra()
    collector = make_collector("multisync", ENV, agent.policy(explore=False), ("physics",), workers=2,
                               steps_per_batch=12, total_frames=2 * 2 * 12 * 2)
    buffer, actions = _two_batches_then_a_zeroed_actor(agent, collector)
    assert buffer.num_episodes == 8 and _skills_per_episode(buffer) == [1] * 8
    first = buffer.episode(0, keys=("physics",))["physics"][0]
    assert not all(torch.equal(first, buffer.episode(i, keys=("physics",))["physics"][0]) for i in range(1, 4))
    assert actions[0] > 0.01 and actions[1] == 0.0  # workers seeded apart; new weights reached both workers


@pytest.mark.slow
def test_ray_workers_fill_the_buffer_and_receive_new_weights():
    """``collector.kind=ray`` on a local Ray instance (2 collector actors): separate streams per worker's envs, one
    skill per episode, and after ``update_policy_weights_`` the actors act with the learner's weights (a zeroed
    actor's mean action is 0), which Ray's actors do not share in memory (without the update they kept acting:
    0.95). Ray is optional (``pip install "latentrl[ray]"``); the test is skipped without it."""
    ray = pytest.importorskip("ray")
    agent = _metra()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        collector = make_collector("ray", ENV, agent.policy(explore=False), ("physics",), workers=2,
                                   steps_per_batch=12)
        collector.update_policy_weights_()
        buffer, actions = _two_batches_then_a_zeroed_actor(agent, collector)
    finally:
        ray.shutdown()
    assert buffer.num_episodes == 8 and _skills_per_episode(buffer) == [1] * 8
    assert actions[0] > 0.01 and actions[1] == 0.0


def test_unknown_collector_kind_is_refused():
    with pytest.raises(ConfigError, match="collector.kind=multiasync: valid kinds are inline, sync, multisync"):
        from latentrl.training.cli import check_train_config

        check_train_config(load_config(["agent=rnd", "env=walker-walk", "collector.kind=multiasync"]))
    with pytest.raises(ValueError, match="inline is the trainer's own loop"):
        make_collector("inline", ENV, _metra().policy(), ("physics",))


def test_train_agent_with_a_multisync_collector_trains_and_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["agent=metra", "env=cheetah-run", "preset=smoke", "agent.obs_type=physics", "env.obs=[physics]",
            "collector.kind=multisync", "collector.workers=2", "collector.steps_per_batch=10", "env.num_envs=2",
            "env.num_workers=0", "learning_starts=40", "updates_per_step=0.1", "eval.every=0", "eval.at_end=false",
            "log.every=40", "log.progress=false", "log.tensorboard=false", f"run_dir={run_dir}"]
    script = str(ROOT / "scripts" / "train_agent.py")
    proc = subprocess.run([sys.executable, script, *args, "steps=80"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["counters"]["env_steps"] == 80 and ckpt["counters"]["updates"] == 8  # 4 per batch of 40
    proc = subprocess.run([sys.executable, script, *args, "steps=120", "resume=true"], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["counters"]["env_steps"] == 120 and ckpt["counters"]["updates"] == 12
    with pytest.raises(SystemExit) as refused:  # in this process: refused before the collector starts its workers
        train_main([*args[:-1], "collector.workers=3", f"run_dir={run_dir}", "steps=160", "resume=true"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "collector.workers: 2 there, 3 now" in err, err[-3000:]
