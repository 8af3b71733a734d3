"""train_agent.py / collect_dataset.py end to end: smoke run, resume after a kill, offline data,
non-finite losses, and config errors that name the valid choices."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentrl.replay import ReplayBuffer
from latentrl.training.cli import ConfigError, collect_main, load_config, train_main
from latentrl.training.evaluation import rollout
from latentrl.training.trainer import NonFiniteLossError, Trainer, resolve_device

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["preset=smoke", "log.progress=false", "log.tensorboard=false"]


def _run_script(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=timeout)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_agent_smoke_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run_script("train_agent.py", "agent=rnd", "env=walker-walk", "preset=smoke", f"run_dir={run_dir}",
                       "log.progress=false", "eval.every=150")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest.pt").exists()
    assert list((run_dir / "videos").glob("*.mp4"))
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").exists()
    rows = _rows(run_dir / "metrics.csv")
    assert any(r.get("critic_loss") for r in rows)
    eval_steps = [int(r["step"]) for r in rows if r.get("eval/return")]
    assert eval_steps == [1, 150, 300]  # at the start, every 150 steps, and the last step only once
    assert "checkpoint:" in proc.stdout and "video:" in proc.stdout
    payload = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert payload["counters"]["env_steps"] == 300 and payload["counters"]["updates"] > 0


def test_resume_continues_a_killed_run(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "latest.pt"
    args = [sys.executable, str(ROOT / "scripts" / "train_agent.py"), *SMOKE, f"run_dir={run_dir}",
            "steps=100000", "checkpoint_every=500"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180

        def logged_past_checkpoint() -> bool:  # the kill loses rows logged after the checkpoint
            return ckpt.exists() and max(int(float(r["step"])) for r in _rows(run_dir / "metrics.csv")) > 500

        while not logged_past_checkpoint() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint written before the deadline"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = torch.load(ckpt, weights_only=True)["counters"]
    assert 0 < killed_at["env_steps"] < 100000
    target = killed_at["env_steps"] + 200
    out = _run_script("train_agent.py", *SMOKE, f"run_dir={run_dir}", f"steps={target}", "resume=true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {ckpt} at env step {killed_at['env_steps']}" in out.stdout
    final = torch.load(ckpt, weights_only=True)
    assert final["counters"]["env_steps"] == target
    assert final["counters"]["updates"] > killed_at["updates"]
    assert final["buffer"] is not None  # the replay buffer travels with the checkpoint
    steps = [int(float(r["step"])) for r in _rows(run_dir / "metrics.csv")]
    assert max(steps) >= target and min(steps) < killed_at["env_steps"]  # one log across both processes
    logged = [int(float(r["step"])) for r in _rows(run_dir / "metrics.csv") if r.get("updates")]
    assert all(a < b for a, b in zip(logged, logged[1:], strict=False))  # dropped: what the kill lost


def test_ctrl_c_stops_on_a_whole_step_and_saves_a_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "latest.pt"
    args = [sys.executable, str(ROOT / "scripts" / "train_agent.py"), *SMOKE, f"run_dir={run_dir}", "steps=100000",
            "checkpoint_every=100000", "env.num_envs=2", "env.num_workers=2"]
    # its own process group, signalled as a whole like a terminal's Ctrl-C (env workers included)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            metrics = run_dir / "metrics.csv"
            if metrics.exists() and any(int(float(r["step"])) >= 150 for r in _rows(metrics)):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "SIGINT: stopping after this step" in err and "checkpoint saved" in err
    stopped_at = torch.load(ckpt, weights_only=True)["counters"]
    assert 150 <= stopped_at["env_steps"] < 100000 and stopped_at["updates"] > 0
    target = stopped_at["env_steps"] + 100
    with pytest.raises(SystemExit) as refused:  # in this process: the refusal comes before any env worker starts
        train_main([*SMOKE, f"run_dir={run_dir}", f"steps={target}", "resume=true"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "env.num_envs: 2 there, 1 now" in err, err[-3000:]
    resumed = _run_script("train_agent.py", *SMOKE, f"run_dir={run_dir}", f"steps={target}", "resume=true",
                          "env.num_envs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(ckpt, weights_only=True)["counters"]["env_steps"] == target


def test_collect_dataset_then_train_offline(tmp_path):
    data = tmp_path / "walker-rnd"
    collect_main([*SMOKE, "env.obs=[state,physics]", "steps=250", f"out={data}", f"run_dir={tmp_path / 'c'}"])
    buffer = ReplayBuffer.load(data)
    assert len(buffer) >= 240 and buffer.num_episodes >= 2
    batch = buffer.sample(8)
    assert batch["next", "physics"].dtype == torch.float64 and batch["state"].shape == (8, 24)

    result = train_main([*SMOKE, f"data={data}", "steps=30", "env.obs=[state,physics]", "checkpoint_every=10",
                         "keep_checkpoints=true", "log.every=10", f"run_dir={tmp_path / 'offline'}"])
    assert "eval/return" in result
    checkpoints = tmp_path / "offline" / "checkpoints"
    payload = torch.load(checkpoints / "latest.pt", weights_only=True)
    assert payload["counters"]["updates"] == 30 and payload["counters"]["env_steps"] == 0
    # keep_checkpoints keeps each one under its update count; later saves do not overwrite earlier ones
    kept = sorted(p.name for p in checkpoints.glob("0*.pt"))
    assert kept == ["000000010.pt", "000000020.pt", "000000030.pt"]
    assert [torch.load(checkpoints / k, weights_only=True)["counters"]["updates"] for k in kept] == [10, 20, 30]
    # offline runs log against the update count (the env step stays 0)
    logged = {int(float(r["step"])) for r in _rows(tmp_path / "offline" / "metrics.csv") if r.get("critic_loss")}
    assert {10, 20, 30} <= logged


def test_non_finite_loss_is_reported_with_the_step(tmp_path, monkeypatch):
    from latentrl.agents.rnd import RNDAgent

    calls = {"n": 0}
    original = RNDAgent.update

    def update(self, batch):
        calls["n"] += 1
        metrics = original(self, batch)
        if calls["n"] == 3:
            metrics["critic_loss"] = math.nan
        return metrics

    monkeypatch.setattr(RNDAgent, "update", update)
    cfg = load_config([*SMOKE, "env.obs=[state,physics]", f"run_dir={tmp_path}"])
    trainer = Trainer(cfg, tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"update 3 \(env step \d+\).*critic_loss=nan"):
        trainer.train()


@pytest.mark.parametrize(
    ("override", "named"),
    [("stepz=10", "steps"), ("agent=rdn", "rnd"), ("env=walker-wlk", "walker-walk"),
     ("eval.episods=3", "eval.episodes")],
)
def test_config_errors_name_valid_choices(override, named):
    with pytest.raises((ConfigError, ValueError), match=named):
        load_config([override])


def test_unknown_agent_field_names_valid_fields(tmp_path):
    with pytest.raises(SystemExit):
        train_main([*SMOKE, "agent.batchsize=8", f"run_dir={tmp_path}"])
    proc = _run_script("train_agent.py", *SMOKE, "agent.batchsize=8", f"run_dir={tmp_path}")
    assert proc.returncode == 2
    assert "batch_size" in proc.stderr


def test_device_auto_and_agent_fields_reach_the_agent(tmp_path):
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    # a repeated agent field is taken from its last mention (scripts append user overrides to their own)
    cfg = load_config([*SMOKE, "agent.batch_size=9", "env.obs=[state,physics]", "eval.num_envs=3",
                       "agent.batch_size=7"])
    trainer = Trainer(cfg, tmp_path, agent_overrides=dict(cfg.agent.overrides))
    assert trainer.agent.config.batch_size == 7 and trainer.spec.batch_size == 7
    assert trainer.eval_env.batch_size == torch.Size([3])  # eval.num_envs: evaluation episodes side by side
    result = rollout(trainer.eval_env, trainer.agent.policy(explore=False), 4)
    assert len(result.returns) == 4 and all(length == trainer.eval_env.episode_length for length in result.lengths)
    trainer.env.close()
    trainer.eval_env.close()


def test_help_lists_keys():
    proc = _run_script("train_agent.py", "--help")
    assert proc.returncode == 0 and "buffer_capacity" in proc.stdout and "learning_starts" in proc.stdout
