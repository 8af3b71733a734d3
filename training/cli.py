"""Command-line entry points: ``train_agent.py`` and ``collect_dataset.py`` (Hydra overrides).

Configs ship inside the package (``latentrl.configs``) and are composed with Hydra's compose API,
so the scripts work from any folder after ``pip install``. Overrides are validated before
composition so that a misspelled key, agent or task names the valid choices.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shutil
import signal
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

__all__ = ["train_main", "collect_main", "eval_main", "load_config", "list_recipes", "check_train_config",
           "ConfigError"]

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
        if key.startswith("~"):
            raise ConfigError(f"override {item!r} deletes a key; every key of the run config is needed: set it "
                              f"instead ({plain}=<value>; --help lists the keys and their defaults)")
        if plain in ("preset", "recipe") and key != plain:
            item = f"{plain}={value}"  # +preset=smoke: the group is already in the defaults list
        if plain == "env":
            get_task(value)  # raises with the closest task names
        elif plain == "agent":
            if value not in list_agents():
                close = difflib.get_close_matches(value, list_agents(), n=3, cutoff=0.4)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown agent {value!r}.{hint} Valid agents: {', '.join(list_agents())}")
        elif plain.startswith("agent.") and plain.split(".")[1] not in _AGENT_KEYS:
            item = f"++agent.overrides.{plain[len('agent.'):]}={value}"  # ++: a later repeat wins
        elif plain == "recipe":
            _check_recipe(value)
        elif plain in ("preset",):
            pass
        elif plain not in flat and not plain.startswith("agent.overrides."):  # '+key=' adds no new keys
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


def list_recipes() -> dict[str, str]:
    """The run recipes (``recipe=<name>``, ``configs/recipe/<name>.yaml``) and their one-line descriptions."""
    from importlib import resources

    recipes = {}
    for entry in sorted(resources.files("latentrl.configs.recipe").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            lines = [line for line in entry.read_text().splitlines() if line.startswith("# recipe:")]
            recipes[entry.name[: -len(".yaml")]] = lines[0][len("# recipe:"):].strip() if lines else ""
    return recipes


def _check_recipe(name: str) -> None:
    recipes = list_recipes()
    if name not in recipes:
        close = difflib.get_close_matches(name, list(recipes), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}.{hint} Valid recipes: {', '.join(recipes)} "
                          "(train_agent.py --help describes each)")


def _recipe_per_domain(task: Any, default: Any, *pairs: Any) -> Any:
    """``${recipe_per_domain:${env.task},<default>,<domain>,<value>,...}``: a recipe value that depends on the
    domain of the run's task (TD-JEPA's discount is 0.98, but 0.99 on point_mass_maze)."""
    if len(pairs) % 2:
        raise ConfigError(f"recipe_per_domain takes a default then <domain>,<value> pairs, got {list(pairs)}")
    return dict(zip(pairs[0::2], pairs[1::2], strict=True)).get(str(task).split("-", 1)[0], default)


OmegaConf.register_new_resolver("recipe_per_domain", _recipe_per_domain, replace=True)


def load_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """Compose ``latentrl.configs/<config_name>.yaml`` with command-line ``overrides``.

    Command-line keys override a ``recipe=<name>``'s values; interpolations (a recipe's per-domain values)
    are resolved here, so the run's saved config holds plain values.
    """
    _register_env_group()
    with initialize_config_module(config_module="latentrl.configs", version_base="1.3"):
        base = compose(config_name=config_name)
        checked = _validate_overrides(overrides, base)
        try:
            cfg = compose(config_name=config_name, overrides=checked)
        except HydraException as err:
            raise ConfigError(_hydra_message(err)) from None
    _check_recipe_agent(overrides, cfg)
    OmegaConf.resolve(cfg)
    return cfg


def _check_recipe_agent(overrides: list[str], cfg: DictConfig) -> None:
    """A recipe's agent settings are for its own agent: ``recipe=td_jepa_pixels agent=fb`` is refused."""
    from importlib import resources

    recipe = next((item.split("=", 1)[1] for item in overrides if item.lstrip("+").startswith("recipe=")), None)
    if recipe is None:
        return
    text = resources.files("latentrl.configs.recipe").joinpath(f"{recipe}.yaml").read_text()
    defaults = yaml.safe_load(text).get("defaults", [])
    agent = next((d["override /agent"] for d in defaults if isinstance(d, dict) and "override /agent" in d), None)
    if agent is not None and cfg.agent.name != agent:
        others = [name for name in list_recipes() if name.startswith(f"{cfg.agent.name}_")]
        hint = f", or use a recipe of {cfg.agent.name} ({', '.join(others)})" if others else ""
        raise ConfigError(f"recipe={recipe} sets the settings of agent {agent}, not of agent={cfg.agent.name}: drop "
                          f"agent={cfg.agent.name}{hint}")


def _hydra_message(err: Exception) -> str:
    """Hydra's error on one line, without its config search path (``preset=foo``: the valid presets)."""
    text = str(err).split("\nConfig search path")[0].strip()
    head, _, options = text.partition("\n\nAvailable options in ")
    if options:
        group, _, names = options.partition(":")
        text = f"{head}; valid choices for {group}: {', '.join(n.strip() for n in names.split() if n.strip())}"
    return " ".join(text.split())


# --------------------------------------------------------------------------------------- value checks
def _shown(value: Any) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (not value or value != value.strip()):
        return repr(value)
    return str(value)


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is a whole number (``1000``, ``1000.0``, ``"1e3"``); bools are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_int(key: str, value: Any, *, low: int, high: int | None = None, meaning: str, example: Any,
              optional: bool = False) -> int | None:
    """``value`` as an int in ``[low, high]`` (``None`` too when ``optional``), else a :class:`ConfigError`
    that names the value, the valid range and an example."""
    if optional and value is None:
        return None
    number = _as_int(value)
    if number is not None and number >= low and (high is None or number <= high):
        return number
    span = f">= {low}" if high is None else f"from {low} to {high}"
    raise ConfigError(f"{key}={_shown(value)}: {key} must be an integer {span}{' or null' if optional else ''} "
                      f"({meaning}); e.g. {key}={example}")


def check_real(key: str, value: Any, *, above: float, meaning: str, example: Any) -> float:
    """``value`` as a finite float ``> above``, else a :class:`ConfigError`."""
    number = _as_float(value)
    if number is not None and math.isfinite(number) and number > above:
        return number
    raise ConfigError(f"{key}={_shown(value)}: {key} must be a finite number > {above:g} ({meaning}); "
                      f"e.g. {key}={example}")


def check_flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={_shown(value)}: {key} must be true or false; e.g. {key}=true")


def check_device(key: str, value: Any) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:<index>`` or ``mps``, available on this machine."""
    import torch

    match = re.fullmatch(r"(auto|cpu|cuda|mps)(?::(\d+))?", value) if isinstance(value, str) else None
    if match is None or (match.group(1) in ("auto", "mps") and match.group(2) is not None):
        raise ConfigError(f"{key}={_shown(value)}: {key} must be auto (cuda when present, else cpu), cpu, cuda, "
                          f"cuda:<index> or mps; e.g. {key}=auto")
    kind, index = match.groups()
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch is built without CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA GPU: check the driver and CUDA_VISIBLE_DEVICES")
            raise ConfigError(f"{key}={value}: CUDA is not available here ({why}); use {key}=cpu, or {key}=auto to "
                              "take a GPU where there is one")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ConfigError(f"{key}={value}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                              f"e.g. {key}=cuda:0")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={value}: Apple's MPS backend is not available here; use {key}=cpu or {key}=auto")
    return value


def _check_folder(key: str, value: Any, what: str) -> str:
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={value}: no such folder; {key} takes {what}")
    if not path.is_dir():
        raise ConfigError(f"{key}={value} is a file, not a folder; {key} takes {what}")
    return str(value)


# key: (lowest valid value, meaning, example)
_RUN_INTS = {
    "steps": (1, "env steps to collect online, updates to make offline", 100000),
    "buffer_capacity": (2, "replay rows, about one per env step", 1000000),
    "learning_starts": (0, "env steps collected before the first update", 4000),
    "checkpoint_every": (0, "env steps / updates between checkpoints; 0: only at the end", 10000),
    "eval.every": (0, "env steps / updates between evaluations; 0: only at the end", 10000),
    "eval.episodes": (1, "episodes per evaluation; to skip evaluation set eval.every=0 eval.at_end=false", 2),
    "eval.num_envs": (1, "evaluation episodes run side by side", 1),
    "eval.video_fps": (1, "frames per second of evaluation videos", 30),
    "log.every": (1, "env steps / updates between rows of metrics.csv", 1000),
    "env.num_envs": (1, "envs stepped side by side", 1),
    "env.image_size": (1, "camera frames are image_size x image_size pixels", 64),
    "env.action_repeat": (1, "physics steps per agent action", 1),
}
_RUN_OPTIONAL_INTS = {
    "env.episode_length": (1, "agent steps per episode; null: the task's own", 1000),
    "env.num_workers": (0, "worker processes stepping the envs; 0: in this process; null: automatic", 2),
}
_RUN_FLAGS = ("resume", "overwrite", "keep_checkpoints", "eval.video", "eval.at_end", "log.tensorboard", "log.progress")
SEED_MAX = 2**31 - 1


def check_train_config(cfg: DictConfig) -> None:
    """Check every value of a run config against its valid range, before anything is built or written.

    Whole numbers given as floats (``steps=1e5``) are stored back as ints. Raises :class:`ConfigError`
    naming the key, the value, the valid range and an example.
    """
    import os

    from latentrl.envs import get_task

    def get(key: str):
        return OmegaConf.select(cfg, key)

    def put(key: str, value) -> None:
        if get(key) != value or type(get(key)) is not type(value):
            OmegaConf.update(cfg, key, value, force_add=True)

    put("seed", check_int("seed", get("seed"), low=0, high=SEED_MAX,
                          meaning="seeds Python, NumPy, torch and the envs", example=0))
    check_device("device", get("device"))
    if get("buffer_device") is None:
        put("buffer_device", "auto")  # absent in older run configs
    check_device("buffer_device", get("buffer_device"))
    threads = get("threads")
    if threads != "auto":
        put("threads", check_int("threads", threads, low=1, meaning="torch CPU threads of the learner; auto: half the "
                                 "cores", example=f"auto or threads={max(1, (os.cpu_count() or 2) // 2)}"))
    for key, (low, meaning, example) in _RUN_INTS.items():
        put(key, check_int(key, get(key), low=low, meaning=meaning, example=example))
    for key, (low, meaning, example) in _RUN_OPTIONAL_INTS.items():
        put(key, check_int(key, get(key), low=low, meaning=meaning, example=example, optional=True))
    put("updates_per_step", check_real("updates_per_step", get("updates_per_step"), above=0,
                                       meaning="updates per collected env step; 0.5: one update every 2 steps",
                                       example=0.5))
    for key in _RUN_FLAGS:
        value = get(key)
        put(key, False if value is None else check_flag(key, value))  # overwrite: absent in older run configs
    _check_collector(get, put)
    if cfg.get("resume") and cfg.get("overwrite"):
        raise ConfigError("resume=true continues the run in run_dir and overwrite=true replaces it: give one of them")
    for key in ("run_dir", "out", "log.wandb_project"):
        value = get(key)
        if value is not None and not isinstance(value, str):
            put(key, str(value))  # run_dir=123 is a folder name, not a number
        if get(key) == "":
            put(key, None)
    if get("data") is not None:
        put("data", _check_folder("data", get("data"), "the dataset folder collect_dataset.py wrote (its out=...)"))
    task = get("env.task")
    if not isinstance(task, str):
        raise ConfigError(f"env.task={_shown(task)}: give a task name with env=<domain>-<task>, e.g. env=walker-walk")
    get_task(task)  # an unknown name lists the closest ones
    obs = get("env.obs")
    if isinstance(obs, str) and obs != "auto":
        put("env.obs", [obs])  # env.obs=state: one key
    elif not (obs == "auto" or (OmegaConf.is_list(obs) or isinstance(obs, list)) and obs
              and all(isinstance(k, str) for k in obs)):
        raise ConfigError(f"env.obs={_shown(obs)}: env.obs must be auto or a list of observation keys (pixels, "
                          "state, physics); e.g. env.obs=[pixels,state,physics]")


def _check_collector(get, put) -> None:
    """``collector.*``: absent in older run configs (then the trainer's own loop, as those runs had)."""
    from latentrl.training.collectors import COLLECTOR_KINDS

    kind = get("collector.kind")
    if kind is None:
        put("collector.kind", "inline")
    elif kind not in COLLECTOR_KINDS:
        raise ConfigError(f"collector.kind={_shown(kind)}: valid kinds are {', '.join(COLLECTOR_KINDS)} (inline: the "
                          "trainer steps the envs itself); e.g. collector.kind=multisync")
    limits = {"collector.workers": ("collector processes (multisync, ray)", 2),
              "collector.steps_per_batch": ("steps of every env per collected batch", 50)}
    for key, (meaning, default) in limits.items():
        value = get(key)
        put(key, default if value is None else check_int(key, value, low=1, meaning=meaning, example=default))
    inline_steps = get("collector.inline_steps")
    if inline_steps is None:
        put("collector.inline_steps", "auto")
    elif inline_steps != "auto":
        put("collector.inline_steps", check_int("collector.inline_steps", inline_steps, low=1,
                                                meaning="env steps the inline loop keeps on the env's device before "
                                                        "one write to the buffer", example=16))


def typed_config_overrides(config_class: type, defaults: Any, overrides: dict, prefix: str = "",
                           source: str = "the preset") -> dict:
    """``overrides`` of ``config_class`` fields, each checked against the type of its value in ``defaults`` (the
    preset's config; the type hint where that value is None) and returned typed: whole numbers as int for int
    fields, numbers as float for float fields, ``None`` only where the type hint is optional. A mismatch raises
    ConfigError naming the field, ``source``'s value and an example (``{prefix}{field}=<value>``). Fields the
    config lacks are passed through: ``make_config`` names them with the valid ones. Used by ``agent.<field>=``
    here and by the benchmarks' ``--set``."""
    hints = typing.get_type_hints(config_class)
    out = {}
    for field, value in overrides.items():
        if not hasattr(defaults, field):
            out[field] = value
            continue
        default = getattr(defaults, field)
        optional = type(None) in typing.get_args(hints.get(field))
        base = type(default) if default is not None else next(
            (t for t in typing.get_args(hints.get(field)) if t is not type(None)), type(None))
        key, kind, typed = f"{prefix}{field}", None, value
        if value is None:
            kind = None if optional else "set (not null)"
        elif base is bool:
            kind = None if isinstance(value, bool) else "true or false"
        elif base is int:
            typed = _as_int(value)
            kind = None if typed is not None else "an integer"
        elif base is float:
            typed = None if isinstance(value, str) else _as_float(value)
            kind = None if typed is not None else "a number"
        elif base is str:
            kind = None if isinstance(value, str) else "a string"
        if kind is not None:
            also = " or null" if optional and value is not None else ""
            raise ConfigError(f"{key}={_shown(value)}: {config_class.__name__}.{field} must be {kind}{also} "
                              f"({source} has {_shown(default)}); e.g. {key}={_shown(default)}")
        out[field] = typed
    return out


def _check_agent_overrides(cfg: DictConfig) -> None:
    """``agent.<field>=<value>`` must have the type of the field's preset value (``agent.batch_size=abc`` is
    refused here, not at the first update)."""
    from latentrl.agents.registry import agent_class

    overrides = dict(cfg.agent.get("overrides") or {})
    cls = agent_class(cfg.agent.name)
    if not overrides or getattr(cls, "config_class", None) is None:
        return
    defaults = cls.make_config(cfg.agent.preset)  # an unknown preset is named by make_config
    typed = typed_config_overrides(cls.config_class, defaults, overrides, prefix="agent.",
                                   source=f"the {cfg.agent.preset!r} preset")
    for field, value in typed.items():
        cfg.agent.overrides[field] = value


# ------------------------------------------------------------------------------------------- run folders
# What train_agent.py writes into a run folder: a folder holding any of them holds a run.
RUN_FILES = ("config.yaml", "metrics.csv", "checkpoints", "model", "tb", "videos", "eval", "zero_shot")


def _run_config(run_dir: Path) -> dict:
    """The ``config.yaml`` of a run folder (read as plain YAML), or ``{}``."""
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_of(saved: dict) -> tuple[Any, Any]:
    agent = saved.get("agent") if isinstance(saved.get("agent"), dict) else {}
    env = saved.get("env") if isinstance(saved.get("env"), dict) else {}
    return agent.get("name"), env.get("task")


def _describe_run(run_dir: Path) -> str:
    """``rnd on walker-walk, checkpoint at env step 300`` (from config.yaml and model/config.json: cheap)."""
    agent, task = _run_of(_run_config(run_dir))
    what = f"{agent} on {task}" if agent and task else "no config.yaml"
    if not (run_dir / "checkpoints" / "latest.pt").exists():
        return f"{what}, no checkpoint"
    try:
        info = json.loads((run_dir / "model" / "config.json").read_text())
        step = f"env step {int(info['env_steps'])}, update {int(info['updates'])}"
    except (OSError, ValueError, KeyError, TypeError):
        step = "checkpoints/latest.pt"
    return f"{what}, checkpoint at {step}"


def _close_folders(path: Path) -> str:
    """`` Did you mean ...?`` for a mistyped folder name, from its existing siblings."""
    parent = path.parent
    if not parent.is_dir():
        return f" ({parent} does not exist either)"
    names = [p.name for p in parent.iterdir() if p.is_dir()]
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(str(parent / c) for c in close)}?" if close else ""


def _check_resumable(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ConfigError(f"resume=true: run_dir={run_dir} does not exist, so there is no run to continue."
                          f"{_close_folders(run_dir)} Check the path, or drop resume=true to start a new run there")
    if not run_dir.is_dir():
        raise ConfigError(f"resume=true: run_dir={run_dir} is a file, not a run folder; check the path")
    if not (run_dir / "checkpoints" / "latest.pt").is_file():
        if any((run_dir / name).exists() for name in RUN_FILES):
            raise ConfigError(f"resume=true: {run_dir} holds a run without a checkpoint (checkpoints/latest.pt): it "
                              "stopped before its first one, so there is nothing to continue. Start it over with "
                              "overwrite=true (the old files are moved aside)")
        raise ConfigError(f"resume=true: {run_dir} holds no run to continue (no checkpoints/latest.pt). Check the "
                          "path, or drop resume=true to start a new run")


def _newest_run(cfg: DictConfig, root: Path, prefix: str) -> Path:
    """The most recently checkpointed run of this agent and task under ``root`` (config.yaml checked)."""
    runs, foreign = [], []
    for path in sorted(root.glob(prefix + "*")) if root.is_dir() else []:
        if not (path / "checkpoints" / "latest.pt").is_file():
            continue
        if _run_of(_run_config(path)) == (cfg.agent.name, cfg.env.task):
            runs.append(path)
        else:
            foreign.append(path.name)
    skipped = (f"; skipped {len(foreign)} folder(s) whose config.yaml is not a run of {cfg.agent.name} on "
               f"{cfg.env.task}: {', '.join(foreign[:3])}" if foreign else "")
    if not runs:
        raise ConfigError(f"resume=true: no run of {cfg.agent.name} on {cfg.env.task} to continue under {root}/ "
                          f"(looked for {root / (prefix + '*')} with checkpoints/latest.pt{skipped}). Give the run's "
                          "folder with run_dir=<folder>, or drop resume=true to start a new run")
    newest = max(runs, key=lambda p: (p / "checkpoints" / "latest.pt").stat().st_mtime)
    others = f" (pass run_dir=<folder> to continue another of the {len(runs)} runs)" if len(runs) > 1 else ""
    print(f"[latentrl] resume=true: continuing {newest} ({_describe_run(newest)}), the most recently checkpointed "
          f"run of {cfg.agent.name} on {cfg.env.task} under {root}/{others}{skipped}")
    return newest


def _new_run_dir(root: Path, prefix: str) -> Path:
    """A new folder ``runs/<agent>-<task>-<time>``, claimed by creating it (two runs started in the same
    second get two folders)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = root / (prefix + stamp + (f"-{attempt + 1}" if attempt else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run folder under {root}/; give one with run_dir=<folder>")


def _aside_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}" + (f"-{attempt + 1}" if attempt else ""))
        if not path.exists():
            return path
    raise ConfigError(f"too many replaced runs next to {run_dir}; remove some or choose another run_dir")


def _claim_fresh(run_dir: Path, overwrite: bool) -> Path | None:
    """A new run may go into a missing or empty folder; a folder holding a run only with ``overwrite=true``
    (the old run is moved aside, never deleted: returns where to); a folder of other files never."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir} is a file; give a folder (new or empty) for the run")
    if not run_dir.is_dir():
        return None
    entries = sorted(p.name for p in run_dir.iterdir())
    if not entries:
        return None
    if not any(name in RUN_FILES for name in entries):
        listed = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"run_dir={run_dir} holds other files ({listed}), not a latentrl run; give a new or empty "
                          "folder for run_dir" + (" (overwrite=true replaces runs only)" if overwrite else ""))
    if not overwrite:
        raise ConfigError(f"run_dir={run_dir} already holds a run ({_describe_run(run_dir)}); a new run there would "
                          "replace its checkpoint and mix its metrics. Continue it with resume=true, start over with "
                          "overwrite=true (the old run is moved to "
                          f"{run_dir.name}.replaced-<time>), or choose another run_dir")
    aside = _aside_name(run_dir)
    run_dir.rename(aside)
    print(f"[latentrl] overwrite=true: moved the old run in {run_dir} to {aside}; starting a new run")
    return aside


def _resolve_run_dir(cfg: DictConfig) -> tuple[Path, Callable[[], None] | None]:
    """The run folder, and for a new run what puts the folder back as it was if the run fails to start."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir).expanduser()
        if cfg.resume:
            _check_resumable(run_dir)
            return run_dir, None
        aside = _claim_fresh(run_dir, bool(cfg.get("overwrite")))
        return run_dir, lambda: _undo_new_run_dir(run_dir, aside)
    prefix = f"{cfg.agent.name}-{cfg.env.task}-"
    if cfg.resume:
        return _newest_run(cfg, Path("runs"), prefix), None
    run_dir = _new_run_dir(Path("runs"), prefix)
    return run_dir, lambda: _undo_new_run_dir(run_dir, None)


def _undo_new_run_dir(run_dir: Path, aside: Path | None) -> None:
    """A new run that failed to start leaves its folder as it found it (missing, empty, or holding the old run
    that overwrite=true had moved aside), so the same command, fixed, can run again."""
    if run_dir.is_dir():
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        try:
            run_dir.rmdir()  # only if nothing else is in it
        except OSError:
            pass
    if aside is not None and aside.is_dir() and not run_dir.exists():
        aside.rename(run_dir)
        print(f"[latentrl] the new run did not start: moved the old run back from {aside} to {run_dir}")


def _resolve_obs(cfg: DictConfig) -> None:
    if cfg.env.obs != "auto":
        return
    from latentrl.agents.registry import agent_class

    reads = agent_class(cfg.agent.name).required_obs(cfg.agent.preset, **cfg.agent.get("overrides", {}))
    cfg.env.obs = list(dict.fromkeys([*reads, "state", "physics"]))


def _prepare(argv: list[str] | None, config_name: str = "train",
             extra_checks=None) -> tuple[DictConfig, Path, Callable[[], None] | None]:
    """Config composed and checked, then the run folder: ``(cfg, run_dir, undo)``; ``undo``, for a new run,
    puts the folder back as it was when the run fails to start."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("Recipes (recipe=<name>: a paper's trainer, env and agent settings together; keys given with it "
              "override the recipe's, e.g. recipe=metra_state steps=200000):\n")
        for name, line in list_recipes().items():
            print(f"  {name:<16} {line}")
        print("\nKeys (set with key=value):\n")
        print(OmegaConf.to_yaml(load_config([], config_name)))
        raise SystemExit(0)
    cfg = load_config(argv, config_name)
    OmegaConf.set_struct(cfg, False)
    check_train_config(cfg)
    _check_agent_overrides(cfg)
    _resolve_obs(cfg)
    if extra_checks is not None:
        extra_checks(cfg)
    # once per job: under torchrun rank 0 claims the folder and the other ranks get its path
    from latentrl.training import distributed

    run_dir, undo = distributed.main_then_share(_resolve_run_dir, cfg, share=lambda result: (result[0], None))
    cfg.run_dir = str(run_dir)
    return cfg, run_dir, undo


_INPUT_ERRORS = (ValueError, KeyError, OSError, MemoryError)  # OSError: FileNotFoundError, PermissionError, ...


def _fail(err: Exception, code: int = 2) -> None:
    """Exit with one sentence on stderr: code 2 for bad input (nothing ran), 1 for a run that failed."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _exit_if_stopped(trainer) -> None:
    """A run stopped by SIGINT/SIGTERM (checkpoint saved) exits as shells expect of that signal: 128 + its number."""
    if trainer.stopped_by is not None:
        raise SystemExit(128 + int(getattr(signal, trainer.stopped_by)))


def _check_online_training(cfg: DictConfig) -> None:
    if cfg.data is None and cfg.learning_starts >= cfg.steps:
        raise ConfigError(f"learning_starts={cfg.learning_starts} >= steps={cfg.steps}: the run would end before its "
                          f"first update and the agent would learn nothing; lower learning_starts (e.g. "
                          f"learning_starts={cfg.steps // 4}) or raise steps")


def train_main(argv: list[str] | None = None) -> dict:
    """``train_agent.py``: train an agent online or offline; prints where results went.

    Exit codes: 2 for bad input (a sentence on stderr, nothing trained or overwritten), 1 when training
    stopped on non-finite values (the last checkpoint is kept) or, data-parallel, when another rank failed.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), the process joins the job's process group
    and trains its share of every batch (``latentrl.training.distributed``); rank 0 alone prints and writes."""
    from latentrl.training import distributed
    from latentrl.training.trainer import NonFiniteLossError, Trainer

    undo = None
    try:
        distributed.init_from_env()
        cfg, run_dir, undo = _prepare(argv, extra_checks=_check_online_training)
        trainer = Trainer(cfg, run_dir, agent_overrides=dict(cfg.agent.get("overrides", {})))
    except _INPUT_ERRORS as err:
        if undo is not None:
            undo()
        distributed.mark_failed(err)
        _fail(err)
    main = distributed.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        mode = f"offline on {cfg.data}" if cfg.data else f"online on {cfg.env.task} x{cfg.env.num_envs}"
        ranks = f" x{trainer.world_size} processes" if trainer.world_size > 1 else ""
        print(f"[latentrl] training {cfg.agent.name} ({cfg.agent.preset}) {mode}{ranks}; device {trainer.device}; "
              f"run dir {run_dir}")
    try:
        result = trainer.train()
    except NonFiniteLossError as err:
        distributed.mark_failed(err)
        _fail(err, code=1)
    except Exception as err:
        if distributed.current() is None:
            raise
        if not distributed.is_collective_failure(err):  # this rank's own error: say so to the others, then raise
            distributed.mark_failed(err)
            raise
        _fail(distributed.PeerFailedError(
            f"{distributed.describe_peer_failure(err)}. The job stops; continue it from its last checkpoint with "
            f"torchrun ... scripts/train_agent.py ... resume=true run_dir={run_dir}"), code=1)
    distributed.shutdown()
    _exit_if_stopped(trainer)
    if not main:
        return result
    print(f"[latentrl] done: {trainer.env_steps} env steps, {trainer.updates} updates")
    print(f"[latentrl] logs:       {run_dir / 'metrics.csv'} and {run_dir / 'tb'} (tensorboard --logdir {run_dir})")
    print(f"[latentrl] checkpoint: {trainer.checkpoint_path}")
    if getattr(trainer, "last_video", None):
        print(f"[latentrl] video:      {trainer.last_video}")
    figures = list((run_dir / "eval").glob("*.png"))  # an agent's own evaluation plots (METRA's skills)
    if figures:
        print(f"[latentrl] figure:     {max(figures, key=lambda f: f.stat().st_mtime_ns)}")
    if result:
        print("[latentrl] evaluation: " + ", ".join(f"{k}={v:.3g}" for k, v in result.items()))
    return result


def _check_collect(cfg: DictConfig) -> None:
    if not cfg.out:
        raise ConfigError("collect_dataset.py needs out=<folder> for the dataset")
    if cfg.data:
        raise ConfigError("collect_dataset.py collects online; drop data=...")
    if "physics" not in cfg.env.obs:
        raise ConfigError("datasets must store physics states (env.obs must include physics)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a new or empty folder for the dataset")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose another out=...")
    # every collected step is kept: one row per step plus one per episode end
    cfg.buffer_capacity = int(cfg.steps * 1.05) + 1000 * cfg.env.num_envs + 1000


def collect_main(argv: list[str] | None = None) -> Path:
    """``collect_dataset.py``: train an exploration agent online and save everything it collected.

    ``out=<folder>`` receives a reward-free dataset with physics states (``ReplayBuffer.save``)
    that ``ReplayBuffer.load`` and ``train_agent.py data=<folder>`` read back.
    """
    from latentrl.training.trainer import NonFiniteLossError, Trainer

    undo = None
    try:
        cfg, run_dir, undo = _prepare(argv, extra_checks=_check_collect)
        out = Path(cfg.out)
        trainer = Trainer(cfg, run_dir, agent_overrides=dict(cfg.agent.get("overrides", {})), finished_ok=True)
    except _INPUT_ERRORS as err:
        if undo is not None:
            undo()
        _fail(err)
    print(f"[latentrl] collecting {cfg.steps} steps of {cfg.env.task} with {cfg.agent.name}; run dir {run_dir}")
    if trainer.current < cfg.steps:  # a resumed collection that had reached steps only writes the dataset
        try:
            trainer.train()
        except NonFiniteLossError as err:
            _fail(err, code=1)
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
    "success_radius": "auto",  # goal mode: success within this distance of the goal; auto: the task's
                               # goal_radius (1 m for bodies that travel, 0.05 for point_mass and reacher)
    "episode_length": None,  # agent steps per evaluation episode; default: the task's own (1000 for most)
    "out": None,            # default: <run dir>/zero_shot
    "overwrite": False,     # replace the results already in out (else an error: earlier results are kept)
    "device": "cpu",
    "seed": 0,
}
REPORT_FILES = ("results.json", "results.csv", "returns.png")


def _check_eval_args(args: dict) -> dict:
    """Every eval_zero_shot.py value against its valid range (typed by YAML, as Hydra types train_agent.py's)."""
    args["samples"] = check_int("samples", args["samples"], low=1, example=10000,
                                meaning="dataset transitions relabelled per reward task")
    args["episodes"] = check_int("episodes", args["episodes"], low=1, example=10,
                                 meaning="evaluation episodes per reward task")
    args["goals"] = check_int("goals", args["goals"], low=1, example=10, meaning="goal episodes in goal mode")
    if args["success_radius"] in ("auto", None):
        args["success_radius"] = None  # the task's goal_radius
    else:
        args["success_radius"] = check_real("success_radius", args["success_radius"], above=0, example=1.0,
                                            meaning="goal mode: distance to the goal that counts as reached "
                                                    "(or auto: the task's goal_radius)")
    args["episode_length"] = check_int("episode_length", args["episode_length"], low=1, optional=True, example=1000,
                                       meaning="agent steps per evaluation episode; null: the task's own")
    args["seed"] = check_int("seed", args["seed"], low=0, high=SEED_MAX, example=0, meaning="seeds the evaluation")
    args["overwrite"] = check_flag("overwrite", args["overwrite"])
    check_device("device", args["device"])
    if args["mode"] not in ("reward", "goal", "both"):
        raise ConfigError(f"mode={_shown(args['mode'])}: mode must be reward, goal or both; e.g. mode=reward")
    tasks = args["tasks"]
    if isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks):
        args["tasks"] = ",".join(tasks)  # tasks=[walker-run,walker-walk]
    elif tasks is not None and not isinstance(tasks, str):
        raise ConfigError(f"tasks={_shown(tasks)}: tasks must be <domain>/all or task names separated by commas; "
                          "e.g. tasks=walker/all or tasks=walker-run,walker-walk")
    for key in ("model", "checkpoint", "data", "out"):
        if args[key] is not None:
            args[key] = str(args[key])
    if args["model"] and args["checkpoint"] and args["model"] != args["checkpoint"]:
        raise ConfigError("give model=<path> or checkpoint=<path>, not both")
    if not (args["model"] or args["checkpoint"]):
        raise ConfigError("eval_zero_shot.py needs model=<run>/model (or a checkpoint: "
                          "<run>/checkpoints/latest.pt)")
    if args["data"] is not None:
        _check_folder("data", args["data"], "a dataset folder (collect_dataset.py's out=...)")
    return args


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; give a folder for the results")
    held = [name for name in REPORT_FILES if (out / name).exists()]
    if held and not overwrite:
        raise ConfigError(f"{out} already holds results ({', '.join(held)}) of an earlier evaluation; keep them and "
                          "give another out=<folder>, or replace them with overwrite=true")


def eval_main(argv: list[str] | None = None) -> list:
    """``eval_zero_shot.py model=<run>/model tasks=<domain>/all``: zero-shot reward / goal evaluation.

    ``model`` is a model directory (what ``train_agent.py`` writes as ``<run>/model``) or a training
    checkpoint (``<run>/checkpoints/latest.pt``); neither can run code when opened. Bad input exits with
    code 2 and one sentence, before anything is evaluated or written."""
    from latentrl.agents.model_files import load_agent_for_inference
    from latentrl.envs.tasks import resolve_task_list
    from latentrl.replay import ReplayBuffer
    from latentrl.training.checkpoint import load_agent
    from latentrl.training.zero_shot import (
        check_dataset_fits,
        check_tasks_fit,
        evaluate_goals,
        evaluate_reward_tasks,
        write_report,
    )

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
            try:
                args[key] = yaml.safe_load(value) if value else None  # numbers and booleans typed, as on Hydra's CLI
            except yaml.YAMLError:
                args[key] = value  # a plain string (checked below)
        args = _check_eval_args(args)
        source = args["model"] or args["checkpoint"]
        if not Path(source).exists():
            raise ConfigError(f"model={source}: no model directory or checkpoint there; train_agent.py writes "
                              "<run>/model and <run>/checkpoints/latest.pt")
        if Path(source).is_dir():
            agent, cfg = load_agent_for_inference(source, device=args["device"])
            cfg.setdefault("run_dir", str(Path(source).parent))
        else:
            agent, cfg = load_agent(source, device=args["device"])
        if not isinstance(cfg.get("env"), dict) or not cfg["env"].get("task"):
            raise ConfigError(f"{source} does not record the env it was trained on (env.task, observations): it was "
                              "not written by train_agent.py, so the tasks and observations to evaluate are unknown")
        env_cfg = {**cfg["env"], "episode_length": args["episode_length"]}
        tasks = resolve_task_list(str(args["tasks"] or f"{env_cfg['task'].split('-', 1)[0]}/all"))
        check_tasks_fit(agent, env_cfg, tasks, source=source)
        data = args["data"] or cfg.get("data")
        if not data:
            raise ConfigError("the agent was trained online: pass data=<dataset folder> to sample tasks from")
        if not args["data"] and not Path(data).is_dir():
            raise ConfigError(f"the dataset the agent trained on, {data}, is not there any more; pass "
                              "data=<dataset folder> (of the same domain and observations)")
        buffer = ReplayBuffer.load(data, device=args["device"])
        check_dataset_fits(agent, buffer, env_cfg, data=data)
        out = Path(args["out"] or Path(cfg.get("run_dir") or ".") / "zero_shot")
        _check_out(out, args["overwrite"])
    except _INPUT_ERRORS as err:
        _fail(err)
    results = []
    if args["mode"] in ("reward", "both"):
        results += evaluate_reward_tasks(agent, buffer, tasks, env_cfg, num_samples=args["samples"],
                                         episodes=args["episodes"], seed=args["seed"])
    if args["mode"] in ("goal", "both"):
        results.append(evaluate_goals(agent, buffer, env_cfg, num_goals=args["goals"],
                                      success_radius=args["success_radius"], seed=args["seed"]))
    paths = write_report(results, out)
    print(f"[latentrl] zero-shot results: {paths['json']}, {paths['csv']}, {paths['plot']}")
    return results
