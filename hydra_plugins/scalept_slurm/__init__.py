"""ScalePT's Hydra plugins: Hydra takes launchers only from the ``hydra_plugins`` namespace."""
