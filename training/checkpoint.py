"""Atomic training checkpoints: agent, optimizers, counters, RNG streams and the replay buffer.

A checkpoint is written to a temporary file in the same folder and moved over the old one with
``os.replace``, so a run killed at any moment leaves either the previous or the new checkpoint,
never half of one.

Checkpoints hold tensors, numbers, strings and containers of them only, and are read with
``torch.load(weights_only=True)``: opening one never runs code. A file that needs pickle (a
checkpoint of latentrl before format 2, or a crafted one) is refused with an error that says why; a value
that would make a new file need pickle is refused when it is saved (``save_atomic``);
``python -m latentrl.training.checkpoint upgrade <path>`` rewrites an old checkpoint you trust.
What a trained agent needs to act lives in a model directory (``latentrl.agents.model_files``),
written next to the checkpoint by the trainer.
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrl.agents.base import Agent

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "capture_rng", "load_agent", "load_checkpoint", "plain",
           "restore_rng", "restore_agent", "save_atomic", "save_checkpoint", "upgrade_checkpoint"]

CHECKPOINT_FORMAT = 2  # 2: weights_only-loadable (RNG states as tensors); 1: pickled numpy RNG state


class CheckpointError(ValueError):
    """A checkpoint file that cannot be opened safely: damaged, not a checkpoint, or needing pickle."""


def capture_rng() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) RNG states, as tensors and plain containers."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the states ``capture_rng`` took; its tensors may have been loaded onto a GPU (``map_location``)."""
    py, nump = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((nump["kind"], nump["keys"].cpu().numpy().astype(np.uint32), nump["pos"], nump["has_gauss"],
                         nump["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def plain(obj: Any) -> Any:
    """``obj`` with NumPy scalars made Python numbers and NumPy arrays made tensors, through dicts, lists and
    tuples: ``torch.load(weights_only=True)`` refuses NumPy objects, so a checkpoint holding one (say a set of
    visited cells as ``np.int64`` tuples) would be written fine and refused at resume."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        items = {k: plain(v) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj  # untouched, so a state dict keeps its class and ``_metadata``
        return {**items} if type(obj) is dict else type(obj)(items)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):  # a named tuple is left as it is
        values = [plain(v) for v in obj]
        if all(a is b for a, b in zip(values, obj, strict=True)):
            return obj
        return values if type(obj) is list else tuple(values)
    return obj


# What torch.load(weights_only=True) rebuilds (torch._weights_only_unpickler's allowed globals), leaves and containers
_LOADABLE_LEAVES = (torch.Tensor, bool, int, float, complex, str, bytes, bytearray, type(None), torch.dtype,
                    torch.device)
_LOADABLE_CONTAINERS = (dict, list, tuple, set, collections.OrderedDict, collections.Counter, torch.Size)


def unloadable(obj: Any, where: str = "it") -> str | None:
    """Where in ``obj`` a value sits that ``torch.load(weights_only=True)`` would refuse (with its type), or None."""
    if isinstance(obj, _LOADABLE_LEAVES):
        return None
    if type(obj) in _LOADABLE_CONTAINERS:  # exactly these: a defaultdict or a named tuple pickles as its class
        if isinstance(obj, dict):
            items = [(f"{where}[{k!r}]", v) for k, v in obj.items()] + [(f"a key of {where}", k) for k in obj]
        else:
            items = [(f"{where}[{i}]", v) for i, v in enumerate(obj)]
        return next((found for w, v in items if (found := unloadable(v, w)) is not None), None)
    return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to a temporary file beside ``path``, then moved over it: a crash or a full disk leaves the
    previous file (or none), never half of one. NumPy values in ``obj`` are stored as Python numbers and tensors
    (``plain``); any other value that ``torch.load(weights_only=True)`` would refuse raises ``CheckpointError``
    here, before anything is written, instead of at the resume hours later."""
    path = Path(path)
    obj = plain(obj)
    bad = unloadable(obj, "the payload")
    if bad is not None:
        raise CheckpointError(f"cannot write {path}: {bad} would not load back with weights_only=True (no code runs "
                              "when a checkpoint is opened); store tensors, numbers, strings and containers of them")
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def agent_spec(agent: Agent) -> dict:
    """What rebuilds ``agent``'s networks without an env: its config as written, observation shape, action size."""
    import dataclasses

    return {"config": dataclasses.asdict(agent.config), "obs_shape": list(agent.obs_shape),
            "action_dim": int(agent.action_dim)}


def save_checkpoint(path: str | Path, agent: Agent, *, counters: dict[str, int], config: dict,
                    buffer_state: dict | None = None, keep_as: str | None = None) -> Path:
    """Write everything needed to continue training to ``path`` atomically.

    ``keep_as`` also keeps this checkpoint under that file name beside ``path`` (a hard link where the
    file system allows, else a copy), so that later checkpoints do not replace it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "agent_name": agent.name,
        "agent_spec": agent_spec(agent),
        "agent": agent.state_dict(),
        "optimizers": {k: opt.state_dict() for k, opt in agent.optimizers().items()},
        "agent_extra": agent.extra_state(),
        "counters": dict(counters),
        "rng": capture_rng(),
        "config": config,
        "buffer": buffer_state,
    }
    save_atomic(payload, path)
    if keep_as is not None:
        kept = path.with_name(keep_as)
        kept.unlink(missing_ok=True)
        try:
            os.link(path, kept)
        except OSError:
            shutil.copy2(path, kept)
    return path


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def load_plain(path: str | Path, *, map_location: str | torch.device | None = "cpu", pickled_advice: str = "") -> Any:
    """What a torch file of tensors and plain data holds (a checkpoint, a bench's cached model or episodes), read
    with ``weights_only=True``: opening it never runs code. Raises ``FileNotFoundError`` for a missing file and
    ``CheckpointError`` for a folder, a file that needs pickle (``pickled_advice`` is added to that message: what
    to do about it) and a truncated or foreign one. Every torch file latentrl and its benches read goes through
    here, and every one it writes through ``save_atomic``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a torch file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to open {path}: it needs pickle to rebuild Python objects, and unpickling can run arbitrary "
            f"code ({_first_line(err)}); latentrl's files hold tensors and plain data only. {pickled_advice}".rstrip()
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable torch file (truncated or not a torch file: "
                              f"{_first_line(err)})") from None


def read_checkpoint(path: str | Path) -> dict:
    """The payload of a checkpoint, read with ``weights_only=True`` (``load_plain``); clear errors for every bad
    file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (checkpoints/latest.pt); for a model "
                              "directory use latentrl.load_policy or model=<dir>")
    payload = load_plain(path, pickled_advice=(
        "If this is a checkpoint of an older latentrl that you made yourself, rewrite it once with "
        f"`python -m latentrl.training.checkpoint upgrade {path}` (that reads it with pickle: only for files you "
        "trust)."))
    if not isinstance(payload, dict) or "agent" not in payload or "agent_name" not in payload:
        raise CheckpointError(f"{path} is a torch file but not a latentrl training checkpoint")
    return payload


def _require(payload: dict, keys: tuple[str, ...], path, purpose: str) -> None:
    missing = [k for k in keys if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is not a complete latentrl training checkpoint, "
                              f"so it cannot be used to {purpose}")


def load_checkpoint(path: str | Path, agent: Agent | None = None, *, restore_rng_state: bool = True) -> dict:
    """Load a checkpoint (never running code); with ``agent`` given, restore its parameters, optimizers and
    extra state."""
    payload = read_checkpoint(path)
    if agent is not None:
        restore_agent(payload, agent, path)
    if restore_rng_state:
        _require(payload, ("rng", "counters"), path, "resume training")
        try:
            restore_rng(payload["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise CheckpointError(f"{path} holds random-number-generator states that cannot be restored "
                                  f"({_first_line(err)}); the checkpoint is damaged") from None
    return payload


def restore_agent(payload: dict, agent: Agent, path: str | Path = "the checkpoint") -> None:
    """Put a loaded checkpoint's parameters, optimizer states and extra state into ``agent``."""
    if payload["agent_name"] != agent.name:
        raise ValueError(f"checkpoint {path} holds agent {payload['agent_name']!r}, not {agent.name!r}")
    _require(payload, ("optimizers", "agent_extra"), path, "resume training")
    _load_weights(agent, payload["agent"], path)
    optimizers = agent.optimizers()
    unknown = sorted(set(payload["optimizers"]) - set(optimizers))
    if unknown:
        raise CheckpointError(f"{path} holds optimizer states {unknown} that this {agent.name} agent does not have "
                              f"(it has {sorted(optimizers)}): the checkpoint was written with other agent settings")
    try:
        for name, state in payload["optimizers"].items():
            optimizers[name].load_state_dict(state)
        agent.load_extra_state(payload["agent_extra"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its optimizer or extra state does not fit this {agent.name} agent "
                              f"({_first_line(err)}); it was written with other agent settings") from None


def _load_weights(agent: Agent, state: dict, path) -> None:
    """``agent.load_state_dict(state)``; a mismatch names the file and the first parameters that differ."""
    try:
        agent.load_state_dict(state)
    except RuntimeError as err:
        expected = agent.state_dict()
        missing = sorted(set(expected) - set(state))[:3]
        unexpected = sorted(set(state) - set(expected))[:3]
        shapes = [f"{k} {list(state[k].shape)} there, {list(v.shape)} here" for k, v in expected.items()
                  if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)][:3]
        detail = "; ".join(part for part in (
            f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
            f"shapes differ: {', '.join(shapes)}" if shapes else "") if part) or _first_line(err)
        raise CheckpointError(f"{path}: its weights do not fit this {agent.name} agent ({detail}); it was written "
                              "with other agent settings or observations") from None


def load_agent(path: str | Path, *, device: str = "cpu") -> tuple[Agent, dict]:
    """Rebuild the agent of a training checkpoint for evaluation, from the agent specs stored in it.

    Returns the agent in eval mode and the run config stored with it. No env is built.
    """
    from latentrl.agents.registry import agent_class

    payload = read_checkpoint(path)
    cfg = payload.get("config") or {}
    spec = payload.get("agent_spec")
    if spec is None:
        raise CheckpointError(f"{path} does not record the agent's observation and action shapes (written before "
                              "contracts v2); evaluate the model directory next to it instead")
    cls = agent_class(payload["agent_name"])  # an unknown name lists the registered agents
    try:
        config = cls.config_class(**spec["config"])
        agent = cls(config, tuple(spec["obs_shape"]), int(spec["action_dim"]), device=device)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its agent spec does not build a {payload['agent_name']} agent "
                              f"({_first_line(err)}); the checkpoint is damaged or from another latentrl") from None
    _load_weights(agent, payload["agent"], path)
    try:
        agent.load_extra_state(payload.get("agent_extra") or {})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its extra agent state does not fit ({_first_line(err)})") from None
    agent.eval()
    return agent, cfg


# State-dict prefixes that contracts v2 moved (each world model owns its loss, dual variable and targets).
FORMAT1_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "metra": (("log_lambda", "world_model.log_lambda"),),
    "td_jepa": (("targets.", "world_model.targets."),),
    "fb": (("targets.", "world_model.targets."), ("world_model.phi_encoder.", "world_model.left_encoder."),
           ("world_model.psi_encoder.", "world_model.backward_map."),
           ("world_model.phi_predictor.", "world_model.forward_map.")),
    "rnd": (("rnd.", "world_model.rnd."),),
}


def _spec_from_run_config(payload: dict) -> dict | None:
    """The agent spec of a format-1 checkpoint, from its run config (builds the run's env once)."""
    from latentrl.agents import make_agent
    from latentrl.envs import make_env

    cfg = payload.get("config") or {}
    env_cfg, agent_cfg = cfg.get("env"), cfg.get("agent")
    if not env_cfg or not agent_cfg:
        return None
    env = make_env(env_cfg["task"], obs=tuple(env_cfg["obs"]), image_size=env_cfg["image_size"],
                   action_repeat=env_cfg["action_repeat"], num_envs=1, seed=0, floor=env_cfg["floor"],
                   num_workers=0)
    try:
        agent = make_agent(agent_cfg["name"], env, preset=agent_cfg["preset"], **agent_cfg.get("overrides", {}))
    finally:
        env.close()
    return agent_spec(agent)


def upgrade_checkpoint(path: str | Path) -> Path:
    """Rewrite a format-1 checkpoint (pickled NumPy RNG state) in place as format 2. Reads it with pickle,
    which can run code: only for checkpoints you made yourself."""
    path = Path(path)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "agent" not in payload:
        raise CheckpointError(f"{path} is not a latentrl training checkpoint")
    rng = payload.get("rng", {})
    if isinstance(rng.get("numpy"), tuple):
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if isinstance(rng.get("python"), tuple):
        version, internal, gauss = rng["python"]
        rng["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
    renames = FORMAT1_RENAMES.get(payload.get("agent_name"), ())
    state = {}
    for key, value in payload["agent"].items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value
    payload["agent"] = state
    if "agent_spec" not in payload:
        payload["agent_spec"] = _spec_from_run_config(payload)
    payload["format"] = CHECKPOINT_FORMAT
    payload = plain(payload)  # NumPy scalars a trainer extra put in (before save_atomic converted them)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    torch.load(tmp, map_location="cpu", weights_only=True)  # the rewritten file must load safely
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "upgrade":
        print("usage: python -m latentrl.training.checkpoint upgrade <checkpoint.pt>", file=sys.stderr)
        raise SystemExit(2)
    print(f"rewrote {upgrade_checkpoint(sys.argv[2])} as checkpoint format {CHECKPOINT_FORMAT}")
