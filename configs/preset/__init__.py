"""Whole-run presets (``preset=smoke``, ``preset=small``)."""
