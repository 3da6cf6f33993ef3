"""PTv3 model: ``build_model(cfg.model, num_classes)`` and the Monte-Carlo inference switch."""
from scalept.model.ptv3 import PTv3, build_model, stochastic_inference

__all__ = ["PTv3", "build_model", "stochastic_inference"]
