"""Run recipes: the papers' run settings (trainer, env and agent together), selected with ``recipe=<name>``."""
