"""PTv3 model: ``build_model(cfg.model, num_classes)``, the Monte-Carlo inference switch, inference autocast."""
from scalept.model.ptv3 import (PTv3, build_model, cast_for_inference, inference_autocast, load_norm_statistics,
                                norm_statistics, stochastic_inference)

__all__ = ["PTv3", "build_model", "cast_for_inference", "inference_autocast", "load_norm_statistics",
           "norm_statistics", "stochastic_inference"]
