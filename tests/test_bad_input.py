"""Bad input and faults, tried as a careless (and a hostile) user would: each gives a clear error that
names the bad value and the fix, or the right behaviour; nothing on disk is lost, overwritten or
modified unless asked (``overwrite=true``); no file runs code. docs/reliability.md lists every case
with its behaviour before and after."""

from __future__ import annotations

# ============================================================================ training, CLI, checkpoints
# (section owned by the CLI / training hardening work)

# ================================================================================= data, envs, replay
# (section owned by the data / env hardening work)
