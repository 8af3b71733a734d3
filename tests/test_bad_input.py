"""Bad input and faults, tried as a careless (and a hostile) user would: each gives a clear error that
names the bad value and the fix, or the right behaviour; nothing on disk is lost, overwritten or
modified unless asked (``overwrite=true``); no file runs code. docs/reliability.md lists every case
with its behaviour before and after."""

from __future__ import annotations

# ============================================================================ training, CLI, checkpoints
# (section owned by the CLI / training hardening work)
import hashlib as _hashlib  # noqa: E402
import re as _re  # noqa: E402
import shutil as _shutil  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

import pytest as _pytest  # noqa: E402
import torch as _torch  # noqa: E402

_RUN = ["preset=smoke", "log.progress=false", "log.tensorboard=false", "eval.video=false", "env.obs=[state,physics]",
        "env.episode_length=20", "learning_starts=10", "log.every=10"]


def _cli_exit(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI entry point in-process; it must exit through SystemExit (a raw exception fails the test)."""
    with _pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def _files(folder: _Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): _hashlib.sha1(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _synthetic_dataset(path: _Path, *, domain: str | None, state: int = 24, physics: int = 18,
                       steps: int = 30) -> _Path:
    """A small reward-free dataset on disk (random values of the given sizes), written as collect_dataset.py would."""
    from tensordict import TensorDict

    from latentrl.replay import ReplayBuffer

    g = _torch.Generator().manual_seed(0)
    done = _torch.zeros(1, steps, 1, dtype=_torch.bool)
    done[:, 9::10] = True

    def obs():
        return {"state": _torch.randn(1, steps, state, generator=g),
                "physics": _torch.randn(1, steps, physics, generator=g, dtype=_torch.float64)}

    td = TensorDict({**obs(), "action": _torch.rand(1, steps, 6, generator=g) * 2 - 1,
                     "next": {**obs(), "reward": _torch.zeros(1, steps, 1), "done": done, "truncated": done,
                              "terminated": _torch.zeros_like(done)}}, batch_size=[1, steps])
    buffer = ReplayBuffer(steps * 2, domain=domain)
    buffer.extend(td)
    buffer.save(path)
    return path


@_pytest.mark.parametrize("override, message", [
    ("steps=-5", r"steps=-5: steps must be an integer >= 1 .*e\.g\. steps="),
    ("steps=abc", r"steps=abc: steps must be an integer >= 1"),
    ("steps=3.5", r"steps=3\.5: steps must be an integer"),
    ("steps=0", r"steps=0: steps must be an integer >= 1"),
    ("updates_per_step=-1", r"updates_per_step=-1: updates_per_step must be a finite number > 0"),
    ("updates_per_step=abc", r"updates_per_step=abc: updates_per_step must be a finite number > 0"),
    ("learning_starts=-1", r"learning_starts=-1: learning_starts must be an integer >= 0"),
    ("learning_starts=500", r"learning_starts=500 >= steps=40: .*before its first update.*lower learning_starts"),
    ("buffer_capacity=0", r"buffer_capacity=0: buffer_capacity must be an integer >= 2"),
    ("eval.every=-3", r"eval.every=-3: eval.every must be an integer >= 0 .*0: only at the end"),
    ("eval.episodes=0", r"eval.episodes=0: .*>= 1 .*eval.every=0 eval.at_end=false"),
    ("checkpoint_every=-1", r"checkpoint_every=-1: checkpoint_every must be an integer >= 0"),
    ("log.every=0", r"log.every=0: log.every must be an integer >= 1"),
    ("threads=0", r"threads=0: threads must be an integer >= 1 .*threads=auto"),
    ("threads=-1", r"threads=-1: threads must be an integer >= 1"),
    ("device=tpu", r"device=tpu: device must be auto .*cpu, cuda, cuda:<index> or mps"),
    ("device=cuda:99", r"device=cuda:99: (CUDA is not available here|this machine has \d+ CUDA device)"),
    ("seed=abc", r"seed=abc: seed must be an integer from 0 to"),
    ("seed=-1", r"seed=-1: seed must be an integer from 0 to"),
    ("env.num_envs=0", r"env.num_envs=0: env.num_envs must be an integer >= 1"),
    ("env.episode_length=0", r"env.episode_length=0: .*>= 1 or null"),
    ("resume=maybe", r"resume=maybe: resume must be true or false"),
    ("keep_checkpoints=2", r"keep_checkpoints=2: keep_checkpoints must be true or false"),
    ("data=/no/such/dataset", r"data=/no/such/dataset: no such folder"),
    ("+foo=1", r"unknown config key 'foo'"),
    ("~steps=3", r"deletes a key.*steps=<value>"),
    ("preset=tiny", r"Could not find 'preset/tiny'; valid choices for 'preset': small, smoke$"),
    ("agent.batch_size=abc", r"agent.batch_size=abc: RNDConfig.batch_size must be an integer .*agent.batch_size=32"),
    ("agent.lr=fast", r"agent.lr=fast: RNDConfig.lr must be a number"),
    ("agent.batch_size=0", r"batch_size=0; it must be an integer >= 1: set agent.batch_size"),
    ("overwrite=true resume=true", r"resume=true continues .* overwrite=true replaces it: give one of them"),
])
def test_bad_run_values_exit_2_naming_value_range_and_fix(tmp_path, capsys, override, message):
    """Each bad value is one sentence on stderr (value, valid range, example) with exit code 2, before anything
    is built or written; before: steps=-5 / updates_per_step=-1 / +foo=1 ran, steps=abc / threads=0 /
    device=tpu / seed=abc / agent.batch_size=abc ended in raw tracebacks."""
    from latentrl.training.cli import train_main

    run_dir = tmp_path / "run"
    code, out, err = _cli_exit(train_main, [*_RUN, "steps=40", *override.split(), f"run_dir={run_dir}"], capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one sentence, no traceback
    assert _re.search(message, err.strip()), err
    assert not run_dir.exists()  # nothing written


def test_collect_out_is_never_a_file_or_a_non_empty_folder(tmp_path, capsys):
    from latentrl.training.cli import collect_main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    for out, message in (("data", "exists and is not empty"), ("file", "is a file")):
        code, _, err = _cli_exit(collect_main, [*_RUN, "steps=40", f"out={tmp_path / out}",
                                                f"run_dir={tmp_path / 'run'}"], capsys)
        assert code == 2 and message in err, err
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert not (tmp_path / "run").exists()


def test_reusing_a_run_dir_needs_resume_or_overwrite(tmp_path, capsys):
    """Before: a second run in the same run_dir replaced its checkpoint and appended its metrics to the old
    ones. Now: refused (offering resume=true and overwrite=true); overwrite=true moves the old run aside."""
    from latentrl.training.cli import train_main

    run_dir = tmp_path / "run"
    train_main([*_RUN, "steps=30", f"run_dir={run_dir}"])
    before = _files(run_dir)
    code, _, err = _cli_exit(train_main, [*_RUN, "steps=30", "seed=1", f"run_dir={run_dir}"], capsys)
    assert code == 2 and "already holds a run (rnd on walker-walk, checkpoint at env step 30" in err, err
    assert "resume=true" in err and "overwrite=true" in err
    assert _files(run_dir) == before  # untouched

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = _cli_exit(train_main, [*_RUN, "steps=30", "overwrite=true", f"run_dir={tmp_path / 'other'}"],
                             capsys)
    assert code == 2 and "not a latentrl run" in err and (tmp_path / "other" / "notes.txt").exists()

    # overwrite=true whose new run then fails to start puts the old run back
    code, out, err = _cli_exit(train_main, [*_RUN, "steps=20", "overwrite=true", "agent.batch_size=0",
                                            f"run_dir={run_dir}"], capsys)
    assert code == 2 and "batch_size=0" in err and "moved the old run back" in out, err
    assert _files(run_dir) == before and not list(tmp_path.glob("run.replaced-*"))

    train_main([*_RUN, "steps=20", "seed=1", "overwrite=true", f"run_dir={run_dir}"])
    out = capsys.readouterr().out
    (aside,) = tmp_path.glob("run.replaced-*")
    assert f"moved the old run in {run_dir} to {aside}" in out
    assert _files(aside) == before  # the old run, whole
    payload = _torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert payload["counters"]["env_steps"] == 20
    steps = [line.split(",")[0] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert steps and max(float(s) for s in steps) <= 20  # a fresh log, not the old one's rows too


def test_resume_says_which_run_it_continues_and_never_guesses(tmp_path, capsys, monkeypatch):
    """Before: resume=true took the newest folder by name (a planted one won), and a mistyped run_dir started a
    fresh run. Now: only runs of this agent and task (config.yaml), the chosen one named with its step; a missing
    run_dir is an error naming it; a run already at steps has nothing left to train."""
    from latentrl.training.cli import train_main

    monkeypatch.chdir(tmp_path)
    code, _, err = _cli_exit(train_main, [*_RUN, "steps=30", "resume=true"], capsys)
    assert code == 2 and "no run of rnd on walker-walk to continue under runs/" in err, err
    assert not (tmp_path / "runs").exists()
    train_main([*_RUN, "steps=30"])
    (real,) = (tmp_path / "runs").iterdir()
    planted = tmp_path / "runs" / "rnd-walker-walk-99991231-235959"  # sorts last; another agent's run
    _shutil.copytree(real, planted)
    (planted / "config.yaml").write_text((planted / "config.yaml").read_text().replace("name: rnd", "name: fb"))
    capsys.readouterr()

    train_main([*_RUN, "steps=40", "resume=true"])
    out = capsys.readouterr().out
    assert f"resume=true: continuing runs/{real.name} (rnd on walker-walk, checkpoint at env step 30" in out
    assert f"skipped 1 folder(s) whose config.yaml is not a run of rnd on walker-walk: {planted.name}" in out
    assert f"resumed from runs/{real.name}/checkpoints/latest.pt at env step 30" in out
    assert _torch.load(real / "checkpoints" / "latest.pt", weights_only=True)["counters"]["env_steps"] == 40

    typo = tmp_path / "runs" / real.name.replace("walker", "walkr")
    code, _, err = _cli_exit(train_main, [*_RUN, "steps=50", "resume=true", f"run_dir={typo}"], capsys)
    assert code == 2 and f"run_dir={typo} does not exist" in err and "Did you mean" in err, err
    assert not typo.exists()
    code, _, err = _cli_exit(train_main, [*_RUN, "steps=40", "resume=true", f"run_dir={real}"], capsys)
    assert code == 2 and "already at 40 env steps and steps=40, so nothing is left to train" in err, err


def test_offline_data_must_fit_the_run(tmp_path, capsys):
    """Before: a cheetah dataset trained a walker agent into a shape error at the first update, and a pixel agent
    on a state-only dataset failed with a KeyError at the first sample. Now: exit 2 naming both sides, and the new
    run's folder is left as it was, so the fixed command runs."""
    from latentrl.training.cli import train_main

    cheetah = _synthetic_dataset(tmp_path / "cheetah", domain="cheetah", state=17)
    walker = _synthetic_dataset(tmp_path / "walker", domain="walker")
    run_dir = tmp_path / "run"
    offline = [*_RUN, "agent=td_jepa", "steps=4", "eval.every=0", "eval.at_end=false", f"run_dir={run_dir}"]
    for extra, message in (
        ([f"data={cheetah}", "agent.obs_type=state"], r"holds cheetah steps, but env=walker-walk is a walker task"),
        ([f"data={walker}", "agent.obs_type=pixels", "env.obs=[pixels,state,physics]"],
         r"stores state, physics but the run reads pixels"),
        ([f"data={walker}", "agent.obs_type=state", "agent.batch_size=0"], r"batch_size must be >= 2 .*got 0"),
    ):
        code, _, err = _cli_exit(train_main, [*offline, *extra], capsys)
        assert code == 2 and _re.search(message, err), err
        assert not run_dir.exists()  # a failed start leaves no half run behind
    train_main([*offline, f"data={walker}", "agent.obs_type=state"])
    assert (run_dir / "checkpoints" / "latest.pt").exists()


@_pytest.mark.parametrize("fault", ["parameter", "observations", "solver"])
def test_non_finite_values_stop_training_naming_update_and_parameter(tmp_path, capsys, monkeypatch, fault):
    """Before: a parameter turned NaN by an update while the losses stayed finite trained on silently and was
    saved over the good checkpoint; NaN observations ended in a raw NonFiniteLossError traceback that did not
    say where the NaN came from. Now: exit 1 with one sentence naming the update, the env step and the first bad
    parameter (or the bad inputs); the checkpoint keeps the last finite state."""
    import latentrl.training.trainer as trainer_module
    from latentrl.agents.rnd import RNDAgent
    from latentrl.training.cli import train_main

    calls = {"n": 0}
    if fault == "parameter":
        original = RNDAgent.update

        def update(self, batch):  # from the 10th call on, an update that breaks a parameter but reports finite losses
            calls["n"] += 1
            if calls["n"] < 10:
                calls["metrics"] = original(self, batch)
            else:
                with _torch.no_grad():
                    self.actor_critic.critic_target.q1[2].bias.fill_(float("nan"))
            return calls["metrics"]

        monkeypatch.setattr(RNDAgent, "update", update)
    else:
        original = trainer_module.sample_batches

        def sample_batches(buffer, spec):
            batch = original(buffer, spec)
            calls["n"] += 1
            if calls["n"] == 10:
                batch["state"][0, 0] = float("nan")
            return batch

        monkeypatch.setattr(trainer_module, "sample_batches", sample_batches)
    if fault == "solver":  # what TD-JEPA's eigen-solver does on NaN inputs: raise instead of returning NaN
        update_with_losses = RNDAgent.update

        def update(self, batch):
            if not _torch.isfinite(batch["state"]).all():
                raise _torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
            return update_with_losses(self, batch)

        monkeypatch.setattr(RNDAgent, "update", update)
    run_dir = tmp_path / "run"
    code, _, err = _cli_exit(train_main, [*_RUN, "steps=60", "checkpoint_every=20", "log.every=1000",
                                          f"run_dir={run_dir}"], capsys)
    assert code == 1 and err.startswith("error: non-finite ") and err.count("\n") == 1, err
    if fault == "solver":
        assert _re.search(r"non-finite observations at update 10 \(env step \d+\): the sampled batch held non-finite "
                          r"values in state \(1 values\) and the update failed \(linalg.eigh: ", err), err
    elif fault == "parameter":
        assert _re.search(r"non-finite parameter after update \d+ \(env step 40\): actor_critic\.critic_target\."
                          r"q1\.2\.bias \(1 of 1 values non-finite\); every parameter was finite at update [1-9]\b",
                          err), err
    else:
        assert _re.search(r"at update 10 \(env step \d+\): .*=nan.*the sampled batch held non-finite "
                          r"observations: state \(1 values\)", err), err
    payload = _torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    assert payload["counters"]["env_steps"] == 20
    assert all(_torch.isfinite(v).all() for v in payload["agent"].values() if v.is_floating_point())


def _walker_model(tmp_path: _Path, *, data: str | None = None) -> _Path:
    """A model directory of a TD-JEPA agent trained on walker-walk states (untrained weights: enough to check
    what eval_zero_shot.py refuses before it runs anything)."""
    from latentrl.agents import agent_class
    from latentrl.agents.model_files import save_model

    cls = agent_class("td_jepa")
    agent = cls(cls.make_config("smoke", obs_type="state"), (24,), 6, device="cpu")
    env = {"task": "walker-walk", "obs": ["state", "physics"], "image_size": 64, "camera": None,
           "action_repeat": 1, "num_envs": 1, "num_workers": None, "backend": "dmc", "floor": "default",
           "episode_length": 20}
    return save_model(tmp_path / "run" / "model", agent, env=env,
                      extra={"step": 0, "env_steps": 0, "updates": 0, "data": data, "run_dir": str(tmp_path / "run")})


def test_eval_refuses_bad_input_before_running(tmp_path, capsys):
    """Before: a walker model on cheetah tasks (or a cheetah dataset) failed with a matrix shape error deep in a
    network, samples=0 / episodes=0 / seed=abc with raw tracebacks, samples=1.5 and samples=true ran with 1
    sample, and a second evaluation silently replaced the first one's results. Now: exit 2, one sentence."""
    from latentrl.training.cli import eval_main

    walker = _synthetic_dataset(tmp_path / "walker", domain="walker")
    model = _walker_model(tmp_path, data=str(walker))
    cheetah = _synthetic_dataset(tmp_path / "cheetah", domain="cheetah", state=17)
    unknown_domain = _synthetic_dataset(tmp_path / "old", domain=None, state=17)  # a dataset without its domain
    results = tmp_path / "zs"
    results.mkdir()
    (results / "results.json").write_text("{}")
    cases = [
        (["tasks=cheetah/all"], r"trained on walker-walk \(walker; it reads state of shape \[24\] and drives 6 "
                                r"actuators\), but cheetah-walk, .* are tasks of cheetah.*tasks=walker/all"),
        (["tasks=walker-walk", f"data={cheetah}"], r"holds cheetah steps, but the agent was trained on walker-walk"),
        (["tasks=walker-walk", f"data={unknown_domain}"],
         r"stores state of shape \[17\], but the agent .*shape \[24\]"),
        (["tasks=walker-wlk"], r"unknown task 'walker-wlk'. Did you mean: walker-walk"),
        (["samples=0"], r"samples=0: samples must be an integer >= 1"),
        (["samples=1.5"], r"samples=1.5: samples must be an integer >= 1"),
        (["samples=true"], r"samples=true: samples must be an integer"),
        (["episodes=0"], r"episodes=0: episodes must be an integer >= 1"),
        (["goals=0", "mode=goal"], r"goals=0: goals must be an integer >= 1"),
        (["success_radius=-1", "mode=goal"], r"success_radius=-1: success_radius must be a finite number > 0"),
        (["episode_length=abc"], r"episode_length=abc: .*integer >= 1 or null"),
        (["seed=abc"], r"seed=abc: seed must be an integer"),
        (["device=tpu"], r"device=tpu: device must be auto"),
        (["mode=foo"], r"mode=foo: mode must be reward, goal or both"),
        (["tasks=123"], r"tasks=123: tasks must be <domain>/all or task names"),
        (["data=/no/such/dataset"], r"data=/no/such/dataset: no such folder"),
        ([f"out={results}"], r"already holds results \(results.json\).*overwrite=true"),
        ([f"out={walker / 'replay.json'}"], r"is a file; give a folder"),
    ]
    for extra, message in cases:
        code, _, err = _cli_exit(eval_main, [f"model={model}", "samples=8", "episodes=1", *extra], capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (extra, err)
        assert _re.search(message, err), (extra, err)
    assert (results / "results.json").read_text() == "{}"
    online = _walker_model(tmp_path / "online", data=None)
    code, _, err = _cli_exit(eval_main, [f"model={online}", "tasks=walker-walk"], capsys)
    assert code == 2 and "trained online: pass data=" in err


def test_new_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Before: runs/<agent>-<task>-<time> named by the second, so two runs started together shared one folder."""
    import latentrl.training.cli as cli
    from latentrl.training.cli import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt, *a: "20250101-000000")
    cfg = load_config(["preset=smoke"])
    first, second = (r[0] if isinstance(r, tuple) else r for r in (cli._resolve_run_dir(cfg) for _ in range(2)))
    assert first != second and first.is_dir() and second.is_dir()


def test_plus_preset_selects_the_preset():
    """CONVENTIONS.md writes ``+preset=smoke``; before: "preset appears more than once in the final defaults list"."""
    from latentrl.training.cli import load_config

    assert load_config(["+preset=smoke"]).steps == load_config(["preset=smoke"]).steps == 300


@_pytest.fixture(scope="module")
def _trained_run(tmp_path_factory) -> _Path:
    """A finished tiny RND run (30 env steps), copied by the tests that damage it."""
    from latentrl.training.cli import train_main

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_main([*_RUN, "steps=30", f"run_dir={run_dir}"])
    return run_dir


@_pytest.mark.parametrize("damage, message", [
    ("shape", r"latest.pt: its weights do not fit this rnd agent \(shapes differ: actor_critic.actor.trunk.0.weight"),
    ("counters", r"latest.pt lacks counters: it is not a complete latentrl training checkpoint"),
    ("optimizer", r"latest.pt holds optimizer states \['planner'\] that this rnd agent does not have"),
])
def test_checkpoints_that_do_not_fit_are_refused_naming_the_file(_trained_run, tmp_path, capsys, damage, message):
    """Before: a checkpoint whose weights do not fit the agent ended resume=true (and eval_zero_shot.py) in a raw
    load_state_dict traceback; one without counters or with another agent's optimizers in "error: 'counters'" /
    a KeyError. Now: exit 2 naming the file and what does not fit; the checkpoint is left as it was."""
    from latentrl.training.cli import eval_main, train_main

    run_dir = tmp_path / "run"
    _shutil.copytree(_trained_run, run_dir)
    path = run_dir / "checkpoints" / "latest.pt"
    payload = _torch.load(path, weights_only=True)
    if damage == "shape":
        payload["agent"]["actor_critic.actor.trunk.0.weight"] = _torch.zeros(3, 3)
    elif damage == "counters":
        del payload["counters"]
    else:
        payload["optimizers"]["planner"] = {}
    _torch.save(payload, path)
    before = _files(run_dir)
    code, _, err = _cli_exit(train_main, [*_RUN, "steps=40", "resume=true", "log.tensorboard=true",
                                          f"run_dir={run_dir}"], capsys)
    assert code == 2 and err.count("\n") == 1 and _re.search(message, err), err
    assert _files(run_dir) == before  # not even a TensorBoard file is added
    if damage == "shape":
        code, _, err = _cli_exit(eval_main, [f"model={path}", "tasks=walker-walk"], capsys)
        assert code == 2 and _re.search(message, err), err

# ================================================================================= data, envs, replay
# (section owned by the data / env hardening work)

WALKER_PHYSICS = 18  # walker and cheetah states have the same size (qpos 9 + qvel 9); quadruped's has 57

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from latentrl.envs import get_task, make_env  # noqa: E402
from latentrl.replay import ReplayBuffer  # noqa: E402


def _step(num_envs: int = 2, t: int = 0, *, length: int = 4, physics: int = 3, action: int = 2) -> TensorDict:
    """Step ``t`` of ``num_envs`` envs as a TorchRL env returns it; observations encode ``t``."""
    done = torch.full((num_envs, 1), (t + 1) % length == 0)

    def obs(s):
        return {"state": torch.full((num_envs, 3), float(s)),
                "physics": torch.full((num_envs, physics), 0.01 * s, dtype=torch.float64)}

    return TensorDict({**obs(t), "action": torch.full((num_envs, action), 0.5), "next": {
        **obs(t + 1), "reward": torch.ones(num_envs, 1), "done": done, "terminated": torch.zeros_like(done),
        "truncated": done}}, batch_size=[num_envs])


def _rollout(steps: int, **kwargs) -> TensorDict:
    return torch.stack([_step(t=t, **kwargs) for t in range(steps)], 1)


def _buffer(steps: int = 8, capacity: int = 40, **kwargs) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, **{k: v for k, v in kwargs.items() if k == "domain"})
    buffer.extend(_rollout(steps, **{k: v for k, v in kwargs.items() if k != "domain"}))
    return buffer


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> a hash of its bytes (sizes and contents)."""
    return {str(f.relative_to(folder)): hashlib.sha1(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def test_save_never_replaces_a_dataset_unless_asked(tmp_path, monkeypatch):
    first, second = _buffer(8), _buffer(3)
    first.save(tmp_path / "data")
    saved = _digest(tmp_path / "data")
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        second.save(tmp_path / "data")
    assert str(tmp_path / "data") in str(err.value)
    assert _digest(tmp_path / "data") == saved and len(ReplayBuffer.load(tmp_path / "data")) == len(first)

    # a crash while writing (here: the manifest) leaves the old dataset whole, and no half-written folder
    import latentrl.replay.buffer as buffer_module

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(buffer_module.json, "dumps", crash)
        with pytest.raises(OSError, match="disk full"):
            second.save(tmp_path / "data", overwrite=True)
    assert _digest(tmp_path / "data") == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"], "a temporary folder was left behind"

    second.save(tmp_path / "data", overwrite=True)  # asked: replaced, as a whole
    assert len(ReplayBuffer.load(tmp_path / "data")) == len(second)

    # a folder holding anything else is never replaced, not even with overwrite=True; nor is a file
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    for target in (tmp_path / "home", tmp_path / "home" / "notes.txt"):
        with pytest.raises(FileExistsError, match="new or empty folder"):
            first.save(target, overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    first.save(tmp_path / "empty")  # an empty folder is fine
    assert len(ReplayBuffer.load(tmp_path / "empty")) == len(first)

    # an on-disk buffer never writes over rows already stored in its folder (a run's storage without manifest)
    live = ReplayBuffer(40, path=tmp_path / "live")
    live.extend(_rollout(4))
    before = _digest(tmp_path / "live")
    with pytest.raises(FileExistsError, match="already holds stored rows"):
        ReplayBuffer(40, path=tmp_path / "live").extend(_rollout(2))
    assert _digest(tmp_path / "live") == before


def _damage(folder: Path, how: str) -> None:
    storage = folder / "storage"
    if how == "truncated":
        with open(storage / "state.memmap", "r+b") as f:
            f.truncate((storage / "state.memmap").stat().st_size // 2)
    elif how == "missing file":
        (storage / "physics.memmap").unlink()
    elif how == "replay.json missing":
        (folder / "replay.json").unlink()
    elif how == "replay.json not JSON":
        (folder / "replay.json").write_text('{"format": "latentrl.replay/2", "capac')
    elif how == "replay.json without schema":
        meta = json.loads((folder / "replay.json").read_text())
        del meta["schema"]
        (folder / "replay.json").write_text(json.dumps(meta))
    elif how == "dtype differs":
        meta = json.loads((folder / "replay.json").read_text())
        meta["schema"]["specs"]["state"]["dtype"] = "float64"
        (folder / "replay.json").write_text(json.dumps(meta))
    elif how == "rows differ":
        meta = json.loads((folder / "replay.json").read_text())
        meta["capacity"], meta["per_env"] = 80, 40
        (folder / "replay.json").write_text(json.dumps(meta))
    elif how == "storage meta.json missing":
        (storage / "meta.json").unlink()


@pytest.mark.parametrize("how, match", [
    ("truncated", r"state\.memmap holds \d+ bytes, but column 'state' .* needs \d+"),
    ("missing file", r"physics\.memmap .* is missing"),
    ("replay.json missing", r"incomplete: .*storage holds stored rows but .*replay\.json, .* is missing"),
    ("replay.json not JSON", r"replay\.json is damaged"),
    ("replay.json without schema", r"replay\.json is damaged .*'schema'"),
    ("dtype differs", r"'state' is stored as float32 \[3\] .* replay\.json says float64"),
    ("rows differ", r"holds \[40\] rows but the dataset's layout needs 80"),
    ("storage meta.json missing", r"meta\.json is missing"),
])
def test_load_checks_a_dataset_against_its_manifest_and_changes_nothing(tmp_path, how, match):
    _buffer(8).save(tmp_path / "data")
    _damage(tmp_path / "data", how)
    before = _digest(tmp_path / "data")
    with pytest.raises(ValueError, match=match) as err:
        ReplayBuffer.load(tmp_path / "data").sample(4)
    assert "write the dataset again" in str(err.value)
    assert _digest(tmp_path / "data") == before, "loading a damaged dataset changed its files"


def test_loaded_dataset_is_read_only(tmp_path):
    _buffer(8).save(tmp_path / "data")
    before = _digest(tmp_path / "data")
    loaded = ReplayBuffer.load(tmp_path / "data")
    with pytest.raises(RuntimeError, match=r"read-only .* ReplayBuffer\.load\(new_path, writable=True\)"):
        loaded.extend(_step())
    with pytest.raises(RuntimeError, match="read-only"):
        loaded.end_episodes()
    loaded.storage["state"][:] = -123.0  # the mapping is copy-on-write: nothing reaches the files
    loaded.save(tmp_path / "data")  # its own folder: nothing to write
    loaded.state_dict()
    del loaded
    assert _digest(tmp_path / "data") == before, "a dataset opened for training was modified on disk"
    assert (ReplayBuffer.load(tmp_path / "data").sample(16)["state"] != -123.0).all()

    writable = ReplayBuffer.load(tmp_path / "data", writable=True)  # asked: changed in place
    writable.extend(_step(t=8))
    writable.save(tmp_path / "data")
    assert len(ReplayBuffer.load(tmp_path / "data")) == len(writable) == 18


def test_env_step_stores_the_executed_action():
    env = make_env("walker-walk", obs=("state",), num_envs=1, episode_length=3)
    twin = make_env("walker-walk", obs=("state",), num_envs=1, episode_length=3)
    try:
        td, twin_td = env.reset(), twin.reset()
        action = torch.full((1, env.action_spec.shape[-1]), 1e9, dtype=torch.float64)
        action[0, :3] = -1e9
        td["action"] = action
        out = env.step(td)
        clipped = action.clamp(-1, 1).float()
        assert out["action"].dtype == torch.float32 and torch.equal(out["action"], clipped)
        twin_td["action"] = clipped
        assert torch.equal(twin.step(twin_td)["next", "state"], out["next", "state"]), "the physics ran another action"
        buffer = ReplayBuffer(20)
        buffer.extend(out)
        assert torch.equal(buffer.sample(8)["action"], clipped.expand(8, -1))
    finally:
        env.close()
        twin.close()


@pytest.fixture(scope="module")
def walker_workers():
    """Two walker envs in two worker processes (state and physics only)."""
    env = make_env("walker-walk", obs=("state", "physics"), num_envs=2, num_workers=2, episode_length=5)
    yield env
    env.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_actions_never_reach_the_physics(walker_workers, value):
    env = walker_workers
    td = env.reset()
    action = torch.zeros(2, env.action_spec.shape[-1])
    action[1, 2] = value
    td["action"] = action
    with pytest.raises(ValueError, match=rf"non-finite .* env rows \[1\] .*{value}") as err:
        env.step(td)
    assert "PhysicsError" not in str(err.value).split("(dm_control raises PhysicsError)")[0]
    td["action"] = torch.zeros_like(action)  # the env (and its workers) carry on
    assert torch.isfinite(env.step(td)["next", "physics"]).all()


@pytest.mark.parametrize("shape", ["[N, A+1]", "[N]", "[N, 1, A]"])
def test_wrong_action_shapes_are_refused(walker_workers, shape):
    env = walker_workers
    n, a = env.action_spec.shape
    td = env.reset()
    td["action"] = {"[N, A+1]": torch.zeros(n, a + 1), "[N]": torch.zeros(n), "[N, 1, A]": torch.zeros(n, 1, a)}[shape]
    with pytest.raises(ValueError, match=rf"this env takes \[num_envs, A\] = \[{n}, {a}\] \(env\.action_spec\.shape\)"):
        env.step(td)


def test_set_physics_state_refuses_bad_states(walker_workers):
    env = walker_workers
    good = env.reset()["physics"]
    with pytest.raises(ValueError, match=rf"shape \[num_envs, P\] = \[2, {WALKER_PHYSICS}\], got \[2, 19\]"):
        env.set_physics_state(torch.zeros(2, WALKER_PHYSICS + 1))
    bad = good.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"env rows \[0\] hold non-finite"):
        env.set_physics_state(bad)
    assert torch.equal(env.set_physics_state(good)["physics"], good)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_closed_env_refuses_to_step(num_workers):
    env = make_env("walker-walk", obs=("state",), num_envs=2, num_workers=num_workers, episode_length=5)
    td = env.reset()
    td["action"] = torch.zeros(2, env.action_spec.shape[-1])
    env.close()
    env.close()  # twice is fine
    for call in (lambda: env.step(td), env.reset, lambda: env.set_seed(1),
                 lambda: env.set_physics_state(torch.zeros(2, WALKER_PHYSICS))):
        with pytest.raises(RuntimeError, match=r"env is closed .* make a new one with make_env\('walker-walk'"):
            call()


@pytest.mark.parametrize("key", ["state", ("next", "physics"), "action", ("next", "reward")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_extend_refuses_non_finite_data(key, value):
    buffer = _buffer(4)
    step = _step(t=4)
    step[key][1, 0] = value
    if key == ("next", "reward") and value != value:  # NaN marks a reward-free step: stored as it is
        buffer.extend(step)
        return
    name = ".".join(key) if isinstance(key, tuple) else key
    with pytest.raises(ValueError, match=rf"extend\(\) refused '{name}': 1 step\(s\) .* env rows \[1\]"):
        buffer.extend(step)
    assert len(buffer) == 8, "a refused step was stored"
    flat = _rollout(3).reshape(-1)
    flat[key][4] = value
    with pytest.raises(ValueError, match=r"dataset rows \[4\]"):
        ReplayBuffer.from_dataset(flat)


def test_relabel_refuses_another_domains_task(tmp_path):
    buffer = _buffer(8, physics=WALKER_PHYSICS, action=6, domain="walker")
    batch = buffer.sample(16)
    cheetah, walker = get_task("cheetah-run"), get_task("walker-stand")
    with pytest.raises(ValueError, match="'cheetah-run' is a cheetah task, but this buffer holds walker physics"):
        buffer.relabel(cheetah, batch)
    assert torch.isfinite(buffer.relabel(walker, batch)["next", "reward"]).all()
    buffer.save(tmp_path / "data")  # the domain is kept with the dataset
    with pytest.raises(ValueError, match="cheetah task"):
        ReplayBuffer.load(tmp_path / "data").relabel("cheetah-run", batch)
    # with no domain known, another size is still refused, naming both
    with pytest.raises(ValueError, match=rf"quadruped physics states of size 57, but .* size {WALKER_PHYSICS}"):
        ReplayBuffer.relabel(get_task("quadruped-run"), batch)
    with pytest.raises(TypeError, match="expects a task"):
        ReplayBuffer.relabel(42, batch)
    other = _buffer(8, physics=WALKER_PHYSICS, action=2).sample(4)  # actions of another width: named
    with pytest.raises(ValueError, match=r"walker actions of shape \[N, 6\], got \[4, 2\]"):
        ReplayBuffer.relabel(walker, other)


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 0}, r"image_size must be an int in \[2, 1024\], got 0"),
    ({"image_size": -3}, r"image_size must be an int in \[2, 1024\], got -3"),
    ({"image_size": 63}, r"image_size must be even, got 63: .*H\.264.* use 62 or 64"),
    ({"image_size": 100000}, r"got 100000; .* 1024 is the largest supported"),
    ({"image_size": 64.5}, r"got 64\.5 \(float\)"),
    ({"floor": "gradiant"}, r"unknown floor 'gradiant' \(did you mean 'gradient'\?\)"),
    ({"num_envs": 0}, r"num_envs must be an int >= 1, got 0"),
    ({"action_repeat": 0}, r"action_repeat must be an int >= 1, got 0"),
    ({"episode_length": 0}, r"episode_length must be an int >= 1, got 0"),
    ({"episode_length": -5}, r"episode_length must be an int >= 1, got -5"),
    ({"obs": ("pixel", "state")}, r"unknown obs keys \['pixel'\] \(did you mean 'pixels'\?\)"),
    ({"obs": ()}, r"obs is empty"),
    ({"camera": 99}, r"camera 99 is not a camera of 'walker-walk': .* cameras 0\.\.1"),
    ({"num_workers": -1}, r"num_workers must be an int >= 0, got -1"),
    ({"seed": -1}, r"seed must be an int in \[0, .*got -1"),
    ({"device": "gpu"}, r"device 'gpu' is not a torch device"),
    ({"backend": "warp"}, r"unknown backend 'warp'; valid backends: dmc, mjwarp"),
    ({"task": "walker-wlak"}, r"unknown task 'walker-wlak'\. Did you mean: walker-walk"),
])
def test_make_env_refuses_bad_arguments(kwargs, match):
    kwargs = {"task": "walker-walk", "obs": ("state",), "episode_length": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        make_env(**kwargs).close()


def test_gymnasium_ids_validate_like_make_env():
    import gymnasium as gym

    for kwargs, match in [({"image_size": 0}, r"image_size must be an int in \[2, 1024\], got 0"),
                          ({"image_size": 63}, "image_size must be even"),
                          ({"floor": "grass"}, "unknown floor 'grass'"),
                          ({"obs_type": "rgb"}, "unknown obs_type 'rgb'"),
                          ({"episode_length": 0}, "episode_length must be an int >= 1"),
                          ({"action_repeat": 0}, "action_repeat must be an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            gym.make("latentrl/walker-walk-v0", **kwargs).close()
    env = gym.make("latentrl/walker-walk-v0", obs_type="state", image_size=8, episode_length=3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"non-finite .*nan"):
        env.step(np.full(6, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match=r"action has shape \[7\], but this env takes \[A\] = \[6\]"):
        env.step(np.zeros(7, dtype=np.float32))
    env.step(np.zeros(6, dtype=np.float32))
    env.close()
    with pytest.raises(RuntimeError, match=r"closed .* gymnasium\.make\('latentrl/walker-walk-v0'"):
        env.step(np.zeros(6, dtype=np.float32))


def test_replay_buffer_refuses_bad_arguments():
    for capacity in ("abc", 10.7, True, 1, None):
        with pytest.raises(ValueError, match=rf"capacity must be an int >= 2 .* got {capacity!r}"):
            ReplayBuffer(capacity)
    assert ReplayBuffer(1e3).capacity == 1000  # an integral float (1e3 on a command line) is fine
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        ReplayBuffer(10, device="gpu")
    with pytest.raises(ValueError, match="domain must be a domain name such as 'walker'"):
        ReplayBuffer(10, domain="walker-walk")


def test_typed_config_overrides_read_the_field_types():
    """The one checker behind ``agent.<field>=`` and the benchmarks' ``--set``: null only where the type hint is
    optional, whole numbers for int fields, numbers (not strings, not bools) for float fields."""
    from latentrl.agents.active_inference import ActiveInferenceAgent
    from latentrl.training.cli import ConfigError, typed_config_overrides

    cls = ActiveInferenceAgent.config_class
    defaults = ActiveInferenceAgent.make_config("small")
    typed = typed_config_overrides(cls, defaults, {"max_grad_norm": None, "lr": 1, "batch_size": 32.0,
                                                   "decoder": "conv", "unknown_field": 3}, prefix="agent.")
    assert typed == {"max_grad_norm": None, "lr": 1.0, "batch_size": 32, "decoder": "conv", "unknown_field": 3}
    assert isinstance(typed["lr"], float) and isinstance(typed["batch_size"], int)
    assert typed_config_overrides(cls, defaults, {"max_grad_norm": 5}) == {"max_grad_norm": 5.0}
    for bad, message in (({"obs_std": None}, r"agent.obs_std=null: .*obs_std must be set \(not null\)"),
                         ({"batch_size": True}, r"agent.batch_size=true: .* must be an integer \(the preset has 64\)"),
                         ({"batch_size": 2.5}, r"must be an integer"),
                         ({"lr": "fast"}, r"agent.lr=fast: .* must be a number"),
                         ({"max_grad_norm": "x"}, r"must be a number or null"),
                         ({"decoder": 3}, r"must be a string")):
        with pytest.raises(ConfigError, match=message):
            typed_config_overrides(cls, defaults, bad, prefix="agent.")


def test_agent_overrides_are_written_back_typed():
    """``agent.batch_size=1e3`` reaches the agent as the int 1000 and ``agent.max_grad_norm=null`` is accepted
    where the field is optional (the config the run saves and builds from holds the typed values)."""
    from omegaconf import OmegaConf

    from latentrl.training.cli import _check_agent_overrides

    cfg = OmegaConf.create({"agent": {"name": "active_inference", "preset": "small",
                                      "overrides": {"batch_size": "1e3", "max_grad_norm": None, "lr": 1}}})
    _check_agent_overrides(cfg)
    assert OmegaConf.to_container(cfg.agent.overrides) == {"batch_size": 1000, "max_grad_norm": None, "lr": 1.0}
    assert isinstance(cfg.agent.overrides.batch_size, int)
