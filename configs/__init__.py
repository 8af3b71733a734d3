"""Hydra configs shipped inside the package (read with ``initialize_config_module("latentrl.configs")``)."""
