"""LayerNorm with fp32 statistics, parametric or not (Tokenformer's block norms have no parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_tokenformer.tensor_parallel.mappings import copy_to_tensor_model_parallel_region


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, computed in fp32 and cast back to the input dtype.

    parametric=False: no weight/bias (the official Tokenformer blocks). Parametric weight/bias are
    replicated on the tensor-parallel group (``tensor_model_parallel=False``).
    forward: [..., d] -> [..., d].
    ``sequence_parallel``: the input is this rank's sequence chunk, so the weight/bias gradients are
    all-reduced over the TP group (they are replicated parameters used on local rows only).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, parametric: bool = True,
                 params_dtype: torch.dtype = torch.float32, device=None, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.parametric = parametric
        if parametric:
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype, device=device))
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype, device=device))
            for p in (self.weight, self.bias):
                p.tensor_model_parallel = False
                p.partition_dim = 0
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.sequence_parallel and weight is not None:
            weight, bias = copy_to_tensor_model_parallel_region(weight), copy_to_tensor_model_parallel_region(bias)
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
        return F.layer_norm(x.float(), (self.hidden_size,), weight, bias, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, parametric={self.parametric}"
