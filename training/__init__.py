"""The one training loop, evaluation, logging and checkpoints."""
