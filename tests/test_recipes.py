"""Run recipes (``recipe=<name>``): the papers' trainer, env and agent settings reach the run; keys given on
the command line override them; an unknown recipe is one sentence and exit code 2; ``--help`` lists them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from latentrl.agents.registry import agent_class
from latentrl.training.cli import ConfigError, list_recipes, load_config, train_main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("metra_pixels", "metra_state", "td_jepa_pixels", "td_jepa_proprio", "fb_pixels", "fb_proprio",
           "lsd_state", "lsd_pixels", "diayn_state", "diayn_pixels")
BASELINE_OF = {"lsd": "metra", "diayn": "metra"}
"""Recipes named after a baseline that runs as switches of another agent (METRA's LSD and DIAYN)."""


def _agent_config(cfg):
    """The agent config the trainer builds from a composed run config."""
    return agent_class(cfg.agent.name).make_config(cfg.agent.preset, **cfg.agent.overrides)


def test_every_recipe_composes_into_a_valid_agent_config():
    assert set(RECIPES) <= set(list_recipes())
    for name, line in list_recipes().items():
        assert line, f"configs/recipe/{name}.yaml has no '# recipe:' line"
        cfg = load_config([f"recipe={name}"])
        prefix = name.rsplit("_", 1)[0]
        assert cfg.agent.name == BASELINE_OF.get(prefix, prefix)
        _agent_config(cfg)  # every field exists and has a valid value


def test_metra_pixels_sets_the_papers_trainer_env_and_agent_settings():
    cfg = load_config(["recipe=metra_pixels"])
    assert (cfg.env.task, cfg.env.action_repeat, cfg.env.episode_length, cfg.env.num_envs, cfg.env.floor,
            cfg.env.image_size) == ("quadruped-run", 2, 200, 8, "gradient", 64)
    assert (cfg.learning_starts, cfg.buffer_capacity, cfg.updates_per_step) == (10000, 300000, 0.125)
    agent = _agent_config(cfg)
    assert (agent.obs_type, agent.frame_stack, agent.dim_option, agent.discrete) == ("pixels", 3, 4, False)
    assert (agent.hidden_dim, agent.encoder_depth, agent.batch_size, agent.lr) == (1024, 48, 256, 1e-4)
    assert (agent.discount, agent.tau, agent.dual_lambda_init, agent.dual_slack, agent.alpha_init) == \
        (0.99, 5e-3, 30.0, 1e-3, 0.01)


def test_metra_state_uses_the_state_update_ratio_and_buffer():
    cfg = load_config(["recipe=metra_state"])
    assert (cfg.env.task, cfg.env.action_repeat, cfg.env.episode_length, cfg.env.num_envs) == ("cheetah-run", 2, 200, 8)
    assert (cfg.learning_starts, cfg.buffer_capacity, cfg.updates_per_step) == (10000, 1_000_000, 50 / 1600)
    agent = _agent_config(cfg)
    assert (agent.obs_type, agent.dim_option, agent.discrete) == ("physics", 16, True)
    assert agent.obs_normalizer_warmup > 0


@pytest.mark.parametrize("kind", ["state", "pixels"])
def test_baseline_recipes_are_the_metra_recipe_with_the_official_baseline_flags(kind):
    """recipe=lsd_<kind> / diayn_<kind>: every trainer, env and agent setting of recipe=metra_<kind>, plus the
    official flags (LSD: --dual_reg 0 --spectral_normalization 1; DIAYN: --inner 0 --unit_length 0 --dual_reg 0)."""
    metra_cfg = load_config([f"recipe=metra_{kind}"])
    metra = _agent_config(metra_cfg)
    for baseline in ("lsd", "diayn"):
        cfg = load_config([f"recipe={baseline}_{kind}"])
        assert cfg.agent.name == "metra" and cfg.agent.preset == metra_cfg.agent.preset
        for key in ("steps", "learning_starts", "buffer_capacity", "updates_per_step", "env", "eval"):
            assert cfg[key] == metra_cfg[key], (baseline, key)
        agent = _agent_config(cfg)
        assert agent.objective == baseline
        assert {**vars(agent), "objective": "metra"} == vars(metra)  # nothing else differs
        flags = {f: agent.switch(f) for f in ("inner", "unit_length", "dual_reg", "spectral_norm")}
        assert flags == ({"inner": True, "unit_length": True, "dual_reg": False, "spectral_norm": True}
                         if baseline == "lsd" else
                         {"inner": False, "unit_length": False, "dual_reg": False, "spectral_norm": False})


@pytest.mark.parametrize("name, batch", [("td_jepa_pixels", 512), ("td_jepa_proprio", 1024),
                                         ("fb_pixels", 512), ("fb_proprio", 1024)])
def test_zero_shot_recipes_set_the_per_domain_discount_and_learning_rates(name, batch):
    walker = _agent_config(load_config([f"recipe={name}"]))
    maze = _agent_config(load_config([f"recipe={name}", "env=point_mass_maze-reach_top_left"]))
    assert walker.batch_size == maze.batch_size == batch
    assert (walker.discount, maze.discount) == (0.98, 0.99)
    proprio = name.endswith("proprio")
    assert (walker.lr_actor, maze.lr_actor) == (1e-4, 1e-6 if proprio else 1e-4)
    lrs = ("lr_phi", "lr_psi", "lr_predictor") if name.startswith("td_jepa") else ("lr_f", "lr_b")
    assert all(getattr(walker, lr) == 1e-4 for lr in lrs)
    taus = ("encoder_target_tau", "predictor_target_tau") if name.startswith("td_jepa") else ("f_target_tau",
                                                                                              "b_target_tau")
    assert all(getattr(walker, tau) == 1e-3 for tau in taus)
    assert walker.obs_type == ("state" if proprio else "pixels")
    cfg = load_config([f"recipe={name}"])
    assert (cfg.steps, cfg.env.action_repeat, cfg.env.episode_length) == (3_000_000 if proprio else 2_000_000, 1, 1000)


def test_keys_on_the_command_line_override_the_recipe():
    cfg = load_config(["env.num_envs=2", "recipe=metra_pixels", "updates_per_step=0.5", "agent.dim_option=2",
                       "env=cheetah-run", "buffer_capacity=5000", "agent.preset=small_pixels"])
    assert (cfg.env.task, cfg.env.num_envs, cfg.updates_per_step, cfg.buffer_capacity) == ("cheetah-run", 2, 0.5, 5000)
    assert cfg.env.action_repeat == 2 and cfg.learning_starts == 10000  # the rest of the recipe stays
    agent = _agent_config(cfg)
    assert (agent.dim_option, agent.hidden_dim) == (2, 256)  # agent field and agent preset given by the user
    maze = _agent_config(load_config(["recipe=td_jepa_proprio", "env=point_mass_maze-loop", "agent.discount=0.9"]))
    assert (maze.discount, maze.lr_actor) == (0.9, 1e-6)


def test_recipe_values_reach_the_trainer_env_and_agent(tmp_path):
    """A trainer built from recipe=metra_state (tiny agent and buffer): its env and agent hold the recipe's values."""
    from latentrl.training.trainer import Trainer

    cfg = load_config(["recipe=metra_state", "agent.preset=smoke", "buffer_capacity=5000", "env.num_envs=2",
                       "env.num_workers=0",
                       "log.progress=false", "log.tensorboard=false", "threads=1", f"run_dir={tmp_path / 'run'}"])
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    cfg.env.obs = ["physics"]
    trainer = Trainer(cfg, tmp_path / "run", agent_overrides=dict(cfg.agent.overrides))
    try:
        agent = trainer.agent
        assert (agent.config.obs_type, agent.config.dim_option, agent.config.discrete) == ("physics", 16, True)
        assert trainer.cfg.updates_per_step == 50 / 1600 and trainer.cfg.env.action_repeat == 2
        assert trainer.env.batch_size[0] == 2
        td = trainer.env.reset()
        for _ in range(200):
            td = trainer.env.rand_step(td)
            if td["next", "done"].any():
                break
            td = td["next"]
        assert td["next", "truncated"].all() and _ == 199  # 200 agent steps per episode
    finally:
        trainer.env.close()
        trainer.eval_env.close()


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        train_main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_unknown_recipe_is_one_sentence_listing_the_valid_ones(tmp_path, capsys):
    code, _, err = _exit(["recipe=metra_pixel", f"run_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and err.startswith("error: unknown recipe 'metra_pixel'") and err.count("\n") == 1, err
    assert "Did you mean metra_pixels" in err and all(name in err for name in RECIPES)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="recipe=td_jepa_pixels sets the settings of agent td_jepa"):
        load_config(["recipe=td_jepa_pixels", "agent=fb"])


def test_help_lists_the_recipes_one_line_each():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_agent.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, description in list_recipes().items():
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert description in line
