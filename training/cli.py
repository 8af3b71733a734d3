"""Command-line entry points: ``train_agent.py`` and ``collect_dataset.py`` (Hydra overrides).

Configs ship inside the package (``latentrl.configs``) and are composed with Hydra's compose API,
so the scripts work from any folder after ``pip install``. Overrides are validated before
composition so that a misspelled key, agent or task names the valid choices.
"""

from __future__ import annotations

import difflib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

__all__ = ["train_main", "collect_main", "load_config", "ConfigError"]

_AGENT_KEYS = ("name", "preset", "overrides")


class ConfigError(ValueError):
    """A command-line override that does not name a valid key or choice."""


@dataclass
class EnvSettings:
    """The env of a run (see ``latentrl.envs.make_env`` for each field)."""

    task: str = "walker-walk"
    obs: Any = "auto"  # "auto": what the agent reads plus state and physics; or a list of keys
    image_size: int = 64
    camera: Any = None
    action_repeat: int = 1
    num_envs: int = 1
    num_workers: Any = None
    backend: str = "dmc"
    floor: str = "default"
    episode_length: Any = None


def _register_env_group() -> None:
    from latentrl.envs import list_tasks

    cs = ConfigStore.instance()
    for task in list_tasks():
        cs.store(group="env", name=task, node=EnvSettings(task=task))


def _validate_overrides(overrides: list[str], base: DictConfig) -> list[str]:
    """Check override keys and choices against the composed defaults; rewrite agent fields.

    ``agent.<field>=v`` for an agent config field becomes ``+agent.overrides.<field>=v``; the agent
    then refuses unknown fields with the list of valid ones.
    """
    from latentrl.agents.registry import list_agents
    from latentrl.envs import get_task

    out = []
    flat = _flat_keys(OmegaConf.to_container(base, resolve=False))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        plain = key.lstrip("+~")
        if plain == "env":
            get_task(value)  # raises with the closest task names
        elif plain == "agent":
            if value not in list_agents():
                close = difflib.get_close_matches(value, list_agents(), n=3, cutoff=0.4)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown agent {value!r}.{hint} Valid agents: {', '.join(list_agents())}")
        elif plain.startswith("agent.") and plain.split(".")[1] not in _AGENT_KEYS:
            item = f"++agent.overrides.{plain[len('agent.'):]}={value}"  # ++: a later repeat wins
        elif plain in ("preset",):
            pass
        elif plain not in flat and not key.startswith("+"):
            close = difflib.get_close_matches(plain, flat, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown config key {plain!r}.{hint} Valid keys: {', '.join(sorted(flat))}"
            )
        out.append(item)
    return out


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            name = f"{prefix}{k}"
            keys.append(name)
            keys.extend(_flat_keys(v, name + "."))
    return keys


def load_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Compose ``latentrl.configs/<config_name>.yaml`` with command-line ``overrides``."""
    _register_env_group()
    with initialize_config_module(config_module="latentrl.configs", version_base="1.3"):
        base = compose(config_name=config_name)
        checked = _validate_overrides(overrides, base)
        try:
            cfg = compose(config_name=config_name, overrides=checked)
        except HydraException as err:
            raise ConfigError(str(err)) from None
    return cfg


def _resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    prefix = f"{cfg.agent.name}-{cfg.env.task}-"
    if cfg.resume:
        candidates = sorted(p for p in Path("runs").glob(prefix + "*") if (p / "checkpoints" / "latest.pt").exists())
        if candidates:
            return candidates[-1]
    return Path("runs") / (prefix + time.strftime("%Y%m%d-%H%M%S"))


def _resolve_obs(cfg: DictConfig) -> None:
    if cfg.env.obs != "auto":
        return
    from latentrl.agents.registry import agent_class

    reads = agent_class(cfg.agent.name).required_obs(cfg.agent.preset, **cfg.agent.get("overrides", {}))
    cfg.env.obs = list(dict.fromkeys([*reads, "state", "physics"]))


def _prepare(argv: list[str] | None, config_name: str = "train") -> tuple[DictConfig, Path]:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("Keys (set with key=value):\n")
        print(OmegaConf.to_yaml(load_config([], config_name)))
        raise SystemExit(0)
    cfg = load_config(argv, config_name)
    OmegaConf.set_struct(cfg, False)
    _resolve_obs(cfg)
    run_dir = _resolve_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    return cfg, run_dir


def _fail(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


def _exit_if_stopped(trainer) -> None:
    """A run stopped by SIGINT/SIGTERM (checkpoint saved) exits as shells expect of that signal: 128 + its number."""
    if trainer.stopped_by is not None:
        raise SystemExit(128 + int(getattr(signal, trainer.stopped_by)))


def train_main(argv: list[str] | None = None) -> dict:
    """``train_agent.py``: train an agent online or offline; prints where results went."""
    from latentrl.training.trainer import Trainer

    try:
        cfg, run_dir = _prepare(argv)
        trainer = Trainer(cfg, run_dir, agent_overrides=dict(cfg.agent.get("overrides", {})))
    except (ValueError, KeyError, FileNotFoundError, MemoryError) as err:
        _fail(err)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    mode = f"offline on {cfg.data}" if cfg.data else f"online on {cfg.env.task} x{cfg.env.num_envs}"
    print(f"[latentrl] training {cfg.agent.name} ({cfg.agent.preset}) {mode}; device {trainer.device}; "
          f"run dir {run_dir}")
    result = trainer.train()
    _exit_if_stopped(trainer)
    print(f"[latentrl] done: {trainer.env_steps} env steps, {trainer.updates} updates")
    print(f"[latentrl] logs:       {run_dir / 'metrics.csv'} and {run_dir / 'tb'} (tensorboard --logdir {run_dir})")
    print(f"[latentrl] checkpoint: {trainer.checkpoint_path}")
    if getattr(trainer, "last_video", None):
        print(f"[latentrl] video:      {trainer.last_video}")
    if result:
        print("[latentrl] evaluation: " + ", ".join(f"{k}={v:.3g}" for k, v in result.items()))
    return result


def collect_main(argv: list[str] | None = None) -> Path:
    """``collect_dataset.py``: train an exploration agent online and save everything it collected.

    ``out=<folder>`` receives a reward-free dataset with physics states (``ReplayBuffer.save``)
    that ``ReplayBuffer.load`` and ``train_agent.py data=<folder>`` read back.
    """
    from latentrl.training.trainer import Trainer

    try:
        cfg, run_dir = _prepare(argv)
        if not cfg.out:
            raise ConfigError("collect_dataset.py needs out=<folder> for the dataset")
        if cfg.data:
            raise ConfigError("collect_dataset.py collects online; drop data=...")
        if "physics" not in cfg.env.obs:
            raise ConfigError("datasets must store physics states (env.obs must include physics)")
        out = Path(cfg.out)
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} exists and is not empty; choose another out=...")
        # every collected step is kept: one row per step plus one per episode end
        cfg.buffer_capacity = int(cfg.steps * 1.05) + 1000 * cfg.env.num_envs + 1000
        trainer = Trainer(cfg, run_dir, agent_overrides=dict(cfg.agent.get("overrides", {})))
    except (ValueError, KeyError, FileNotFoundError, MemoryError) as err:
        _fail(err)
    print(f"[latentrl] collecting {cfg.steps} steps of {cfg.env.task} with {cfg.agent.name}; run dir {run_dir}")
    trainer.train()
    _exit_if_stopped(trainer)  # a partial dataset is not written: resume=true finishes the collection
    trainer.buffer.save(out)
    print(f"[latentrl] dataset: {out} ({len(trainer.buffer)} transitions, {trainer.buffer.num_episodes} episodes, "
          f"keys {list(cfg.env.obs)})")
    return out


EVAL_DEFAULTS = {
    "model": None,          # a model directory (runs/<run>/model) or a training checkpoint; required
    "checkpoint": None,     # the same as model= (kept for older commands)
    "tasks": None,          # "<domain>/all" or comma-separated task names; default: the training domain's
    "mode": "reward",       # reward | goal | both
    "data": None,           # dataset to sample and relabel; default: the one the agent trained on
    "samples": 10000,       # relabelled transitions per reward task
    "episodes": 10,         # evaluation episodes per reward task
    "goals": 10,            # goal episodes (goal mode)
    "success_radius": 1.0,  # goal mode: success when the final position is this close to the goal
    "episode_length": None,  # agent steps per evaluation episode; default: the task's own (1000 for most)
    "out": None,            # default: <run dir>/zero_shot
    "device": "cpu",
    "seed": 0,
}


def eval_main(argv: list[str] | None = None) -> list:
    """``eval_zero_shot.py model=<run>/model tasks=<domain>/all``: zero-shot reward / goal evaluation.

    ``model`` is a model directory (what ``train_agent.py`` writes as ``<run>/model``) or a training
    checkpoint (``<run>/checkpoints/latest.pt``); neither can run code when opened."""
    from latentrl.agents.model_files import load_agent_for_inference
    from latentrl.envs.tasks import resolve_task_list
    from latentrl.replay import ReplayBuffer
    from latentrl.training.checkpoint import load_agent
    from latentrl.training.zero_shot import evaluate_goals, evaluate_reward_tasks, write_report

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(eval_main.__doc__)
        for key, value in EVAL_DEFAULTS.items():
            print(f"  {key}={value}")
        raise SystemExit(0)
    try:
        args = dict(EVAL_DEFAULTS)
        for item in argv:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"argument {item!r} is not key=value")
            if key not in args:
                close = difflib.get_close_matches(key, args, n=2, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown key {key!r}.{hint} Valid keys: {', '.join(args)}")
            args[key] = yaml.safe_load(value) if value else None  # numbers and booleans typed, as on Hydra's CLI
        if args["model"] and args["checkpoint"] and args["model"] != args["checkpoint"]:
            raise ConfigError("give model=<path> or checkpoint=<path>, not both")
        source = args["model"] or args["checkpoint"]
        if not source:
            raise ConfigError("eval_zero_shot.py needs model=<run>/model (or a checkpoint: "
                              "<run>/checkpoints/latest.pt)")
        if args["mode"] not in ("reward", "goal", "both"):
            raise ConfigError(f"mode must be reward, goal or both, got {args['mode']!r}")
        if Path(str(source)).is_dir():
            agent, cfg = load_agent_for_inference(str(source), device=args["device"])
            cfg.setdefault("run_dir", str(Path(str(source)).parent))
        else:
            agent, cfg = load_agent(str(source), device=args["device"])
        env_cfg = {**cfg["env"], "episode_length": args["episode_length"]}
        data = args["data"] or cfg.get("data")
        if not data:
            raise ConfigError("the agent was trained online: pass data=<dataset folder> to sample tasks from")
        buffer = ReplayBuffer.load(data, device=args["device"])
        tasks = resolve_task_list(str(args["tasks"] or f"{env_cfg['task'].split('-', 1)[0]}/all"))
    except (ValueError, KeyError, FileNotFoundError, MemoryError) as err:
        _fail(err)
    out = Path(args["out"] or Path(cfg["run_dir"]) / "zero_shot")
    results = []
    if args["mode"] in ("reward", "both"):
        results += evaluate_reward_tasks(agent, buffer, tasks, env_cfg, num_samples=int(args["samples"]),
                                         episodes=int(args["episodes"]), seed=int(args["seed"]))
    if args["mode"] in ("goal", "both"):
        results.append(evaluate_goals(agent, buffer, env_cfg, num_goals=int(args["goals"]),
                                      success_radius=float(args["success_radius"]), seed=int(args["seed"])))
    paths = write_report(results, out)
    print(f"[latentrl] zero-shot results: {paths['json']}, {paths['csv']}, {paths['plot']}")
    return results
