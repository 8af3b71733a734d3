"""Env configs: one yaml per task family, selected with ``env=<task>``."""
