"""Agent configs: one yaml per agent, selected with ``agent=<name>``."""
