"""Submanifold sparse convolution (spconv) usable on CPU, on GPU and under autocast."""
from __future__ import annotations

import logging

import spconv.pytorch as spconv
import torch
from spconv.core import ConvAlgo
from torch import nn
from torch.func import functional_call

from scalept.model.points import Level


class _HideFxTracingNotice(logging.Filter):
    """spconv asks torch whether fx is tracing on every convolution; torch >= 2.9 answers with a
    deprecation notice addressed to spconv's authors (not to ScalePT's users) at every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("is_fx_tracing will return true")


logging.getLogger("torch.fx._symbolic_trace").addFilter(_HideFxTracingNotice())


class SubMConv(nn.Module):
    """``spconv.SubMConv3d`` on the points of a :class:`Level`, taking and returning (N, C) features.

    spconv-cu118 asserts CUDA in its default algorithm, so the native one is
    selected whenever the features are on the CPU (the weight layout is the same
    for every algorithm). Under autocast spconv casts to fp16 by itself only in
    training; at inference bf16 features meeting fp32 weights find no kernel, so
    the convolution then runs explicitly in fp16 on GPU (fp32 on CPU), from weights cast per call
    unless :func:`scalept.model.cast_for_inference` stored them in fp16 once.
    Convolutions sharing ``indice_key`` on one level share one rulebook. The
    bias is added outside spconv, whose CPU inference kernels take none.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, indice_key: str, bias: bool = True):
        super().__init__()
        self.conv = spconv.SubMConv3d(in_channels, out_channels, kernel_size, bias=False, indice_key=indice_key)
        self.gpu_algo = self.conv.algo
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, feat: torch.Tensor, level: Level) -> torch.Tensor:
        device = feat.device.type
        self.conv.algo = self.gpu_algo if device == "cuda" else ConvAlgo.Native
        x = spconv.SparseConvTensor(
            feat, level.indices, level.spatial_shape, level.batch_size, indice_dict=level.indice_dict
        )
        autocast = torch.is_autocast_enabled(device)
        weight = self.conv.weight
        if autocast and device == "cuda" and self.training:
            out = self.conv(x)
        else:
            dtype = (torch.float16 if device == "cuda" else torch.float32) if autocast else feat.dtype
            with torch.autocast(device, enabled=False):
                x = x.replace_feature(feat.to(dtype))
                # weights stored in fp16 for inference (cast_for_inference) are used as they are
                out = self.conv(x) if weight.dtype == dtype else \
                    functional_call(self.conv, {"weight": weight.to(dtype)}, (x,))
        level.indice_dict = out.indice_dict
        return out.features if self.bias is None else out.features + self.bias
