"""Models on disk (DESIGN.md): checkpoints load with ``weights_only=True`` and never run code; model
directories are written next to each checkpoint and rebuild a policy / an inference agent alone."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from latentrl.agents import agent_class
from latentrl.agents.model_files import load_agent_for_inference, load_policy, read_model_config, save_model
from latentrl.training.checkpoint import (
    CheckpointError,
    capture_rng,
    load_agent,
    load_checkpoint,
    load_plain,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
    upgrade_checkpoint,
)
from latentrl.training.cli import eval_main, train_main


def small_agent(name: str = "td_jepa"):
    cls = agent_class(name)
    torch.manual_seed(0)
    return cls(cls.make_config("smoke", obs_type="state"), (24,), 6, device="cpu")


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "latest.pt"
    agent = small_agent()
    payload = {"format": 2, "agent_name": "td_jepa", "agent": agent.state_dict(), "evil": RunsCode(marker)}
    torch.save(payload, path)
    for opener in (read_checkpoint, load_checkpoint, lambda p: load_agent(p), load_plain):
        with pytest.raises(CheckpointError, match="refusing to open .*latest.pt.*pickle"):
            opener(path)
    with pytest.raises(CheckpointError, match=r"upgrade .*latest.pt"):  # a checkpoint's own advice
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"pickle.*Delete it\.$"):  # a bench's cached file: the bench's advice
        load_plain(path, pickled_advice="Delete it.")
    assert not marker.exists(), "opening the checkpoint ran code"
    with pytest.raises(SystemExit) as exit_info:  # the evaluation script refuses it too, with exit code 2
        eval_main([f"model={path}", "tasks=walker-walk"])
    assert exit_info.value.code == 2 and not marker.exists()
    # control: the same file really is armed (unpickled without weights_only it runs the command)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "folder", "not_a_checkpoint"])
def test_damaged_checkpoints_give_a_clear_error_naming_the_file(tmp_path, damage):
    agent = small_agent()
    path = tmp_path / "latest.pt"
    save_checkpoint(path, agent, counters={"env_steps": 0, "updates": 0, "episodes": 0}, config={})
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=str(path.name)):
        read_checkpoint(path)
    if damage == "not_a_checkpoint":  # a torch file of plain data: what the benches' own files are
        assert torch.equal(load_plain(path)["weights"], torch.zeros(3))
    else:  # the benches' files (load_plain) get the same clear error for the same damage
        with pytest.raises(CheckpointError, match=str(path.name)):
            load_plain(path)


def test_load_plain_says_which_file_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none.pt")):
        load_plain(tmp_path / "none.pt")


def test_checkpoint_round_trips_with_weights_only_and_rng(tmp_path):
    agent = small_agent()
    path = save_checkpoint(tmp_path / "latest.pt", agent, counters={"env_steps": 5, "updates": 2, "episodes": 1},
                           config={"env": {"task": "walker-walk"}})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == 2 and payload["agent_spec"]["obs_shape"] == [24]
    np.random.seed(3)
    torch.manual_seed(3)
    state = capture_rng()
    expected = (np.random.rand(), torch.rand(1))
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(state)
    assert (np.random.rand(), torch.rand(1)) == expected
    rebuilt, _ = load_agent(path)
    for key, value in agent.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_numpy_values_in_a_checkpoint_load_back_with_weights_only(tmp_path):
    """A trainer's extra state may hold NumPy values (bench_metra's visited cells were ``np.int64`` tuples):
    torch.load(weights_only=True) refuses those, so a pixel run saved fine and was refused at its resume. They
    are stored as Python numbers and tensors; an old file holding them is mended by ``upgrade``."""
    agent = small_agent()
    cells = [(np.int64(-2),), (np.int64(0),)]
    buffer = {"cells": cells, "mean": np.float32(0.5), "counts": np.arange(3), "obs": torch.ones(2)}
    path = save_checkpoint(tmp_path / "latest.pt", agent, counters={"env_steps": np.int64(40), "updates": 5,
                           "episodes": 1}, config={}, buffer_state=buffer)
    payload = load_checkpoint(path)
    assert payload["buffer"]["cells"] == [(-2,), (0,)] and type(payload["buffer"]["cells"][0][0]) is int
    assert payload["counters"]["env_steps"] == 40 and payload["buffer"]["mean"] == 0.5
    assert torch.equal(payload["buffer"]["counts"], torch.arange(3))
    # the state dict saved untouched keeps its class (and the version metadata load_state_dict reads)
    assert hasattr(payload["agent"], "_metadata")
    # a file written before: refused with the upgrade hint, then mended by it
    old = tmp_path / "old.pt"
    torch.save({**torch.load(path, weights_only=True), "buffer": buffer}, old)
    with pytest.raises(CheckpointError, match="upgrade"):
        read_checkpoint(old)
    upgrade_checkpoint(old)
    assert read_checkpoint(old)["buffer"]["cells"] == [(-2,), (0,)]


@pytest.mark.parametrize("bad, where", [
    (Path("/tmp/x"), "['buffer']['root'] (pathlib.PosixPath)"),
    (RunsCode("m"), "['buffer']['root'] (test_models_on_disk.RunsCode)"),
    ({"deep": [1, (2, {3: slice(0, 1)})]}, "['buffer']['root']['deep'][1][1][3] (builtins.slice)"),
    (__import__("collections").defaultdict(int, a=1), "['buffer']['root'] (collections.defaultdict)"),
])
def test_a_value_that_would_not_load_back_is_refused_when_saving(tmp_path, bad, where):
    """A value ``weights_only`` loading refuses (a Path, any object that pickles as its class) stops the save with
    the key that holds it, and the previous checkpoint stays, instead of a resume refusing the file hours later."""
    agent = small_agent()
    counters = {"env_steps": 0, "updates": 0, "episodes": 0}
    path = save_checkpoint(tmp_path / "latest.pt", agent, counters=counters, config={})
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=re.escape(f"cannot write {path}: the payload{where}")):
        save_checkpoint(path, agent, counters=counters, config={}, buffer_state={"root": bad, "ok": torch.ones(2)})
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    # what does load back passes: sets, complex numbers, dtypes, devices, sizes, ordered dicts
    from collections import OrderedDict

    fine = {"root": OrderedDict(a={1, 2}), "c": 1j, "dtype": torch.float16, "device": torch.device("cpu"),
            "size": torch.Size([2, 3])}
    save_checkpoint(path, agent, counters=counters, config={}, buffer_state=fine)
    assert read_checkpoint(path)["buffer"] == fine


def test_upgrade_rewrites_an_old_checkpoint(tmp_path):
    """Format 1 pickled NumPy's RNG state and used the pre-v2 parameter names (refused now); ``upgrade``
    rewrites a trusted one in place, and the agent loads from it."""
    agent = small_agent("fb")
    old_names = {"world_model.targets.": "targets.", "world_model.left_encoder.": "world_model.phi_encoder.",
                 "world_model.backward_map.": "world_model.psi_encoder.",
                 "world_model.forward_map.": "world_model.phi_predictor."}

    def old(key):
        for new, was in old_names.items():
            if key.startswith(new):
                return was + key[len(new):]
        return key

    path = tmp_path / "old.pt"
    config = {"env": {"task": "walker-walk", "obs": ["state", "physics"], "image_size": 64, "action_repeat": 1,
                      "floor": "default"},
              "agent": {"name": "fb", "preset": "smoke", "overrides": {"obs_type": "state"}}}
    payload = {"format": 1, "agent_name": "fb", "agent": {old(k): v for k, v in agent.state_dict().items()},
               "optimizers": {}, "config": config,
               "agent_extra": {}, "counters": {"env_steps": 0, "updates": 0, "episodes": 0},
               "buffer": None, "rng": {"python": __import__("random").getstate(), "numpy": np.random.get_state(),
                                       "torch": torch.get_rng_state()}}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="upgrade"):
        read_checkpoint(path)
    upgrade_checkpoint(path)
    state = read_checkpoint(path)
    assert state["format"] == 2 and state["agent_spec"]["obs_shape"] == [24]
    restore_rng(state["rng"])
    rebuilt, _ = load_agent(path)
    for key, value in agent.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_model_directory_round_trip_and_errors(tmp_path):
    agent = small_agent("fb")
    model = save_model(tmp_path / "model", agent, env={"task": "walker-walk"}, extra={"step": 7})
    config = read_model_config(model)
    assert config["agent"] == "fb" and config["env"]["task"] == "walker-walk" and config["step"] == 7
    rebuilt, _ = load_agent_for_inference(model)
    for key, value in agent.state_dict().items():
        if not key.startswith("world_model.targets."):
            assert torch.equal(rebuilt.state_dict()[key], value), key
    # no optimizer state, targets or critics are stored: the file holds the inference weights only
    from safetensors.torch import load_file

    stored = load_file(str(model / "model.safetensors"))
    assert not any(k.startswith("world_model.targets.") for k in stored)
    assert any(k.startswith("actor.") for k in stored)
    assert any(k.startswith("world_model.backward_map.") for k in stored)
    # overwriting keeps a complete directory
    save_model(model, agent)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_policy(tmp_path / "nowhere")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="damaged"):
        load_policy(model)
    save_model(model, agent)
    config["config"]["z_dim"] = 4  # weights no longer fit the config
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape|fit"):
        load_policy(model)
    (model / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(model)


def test_train_writes_a_model_directory_that_evaluates(walker_dataset, tmp_path):
    """train_agent.py writes <run>/model next to the checkpoint; eval_zero_shot.py model=<dir> evaluates it,
    and its policy acts exactly like the trained agent's."""
    run = tmp_path / "run"
    train_main(["agent=td_jepa", f"data={walker_dataset}", "preset=smoke", "log.progress=false",
                "log.tensorboard=false", "eval.video=false", "eval.every=0", "env.obs=[state,physics]",
                "agent.obs_type=state", "steps=6", f"run_dir={run}"])
    assert (run / "model" / "config.json").exists() and (run / "checkpoints" / "latest.pt").exists()
    agent, _ = load_agent(run / "checkpoints" / "latest.pt")
    policy = load_policy(run / "model")
    from tensordict import TensorDict

    obs = TensorDict({"state": torch.randn(3, 24)}, batch_size=[3])
    carry = policy.init_carry(3)
    reference = agent.policy()
    ref_carry = carry.clone()
    a, _ = policy.step(obs, carry, torch.zeros(3, dtype=torch.bool))
    b, _ = reference.step(obs, ref_carry, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(a, b)
    results = eval_main([f"model={run / 'model'}", "tasks=walker-walk", "samples=64", "episodes=1",
                         "episode_length=5", f"out={tmp_path / 'zs'}"])
    assert len(results) == 1 and results[0].mean is not None and results[0].unsupported is None
    assert (tmp_path / "zs" / "results.json").exists()
