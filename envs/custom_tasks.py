"""Zero-shot evaluation tasks beyond the dm_control suite (placeholder; filled in by the tasks work)."""

CUSTOM_TASKS: dict = {}
