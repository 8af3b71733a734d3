"""Bad input and faults, tried as a careless (and a hostile) user would: each gives a clear error that
names the bad value and the fix, or the right behaviour; nothing on disk is lost, overwritten or
modified unless asked (``overwrite=true``); no file runs code. docs/reliability.md lists every case
with its behaviour before and after."""

from __future__ import annotations

# ============================================================================ training, CLI, checkpoints
# (section owned by the CLI / training hardening work)

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
