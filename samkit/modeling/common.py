"""Small building blocks shared by the encoders and the mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# Below this many rows a product is too small for the convolution route to pay (measured).
_ONEDNN_MIN_ROWS = 256
# oneDNN's bf16 kernels need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on other CPUs (AVX2 only)
# bf16 autocast takes PyTorch's plain routes, which run bf16 everywhere.
_IS_BF16_SUPPORTED = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
ONEDNN_BF16 = bool(_IS_BF16_SUPPORTED is not None and _IS_BF16_SUPPORTED())


def eager_on_cpu(x: torch.Tensor) -> bool:
    """``x`` is computed eagerly on the CPU, where samkit's CPU kernels apply. Not while
    exporting or compiling: graphs keep plain MatMul / attention nodes, which ONNX int8
    quantization and compilers know how to handle."""
    return x.device.type == "cpu" and not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def _onednn_rows(x: torch.Tensor) -> int:
    """The rows of ``x`` (``... x C``) when the oneDNN route applies to it, else 0. A strided
    input would be copied first, so it takes the plain route."""
    rows = x.numel() // max(x.shape[-1], 1)
    applies = (eager_on_cpu(x) and rows >= _ONEDNN_MIN_ROWS and x.is_contiguous()
               and (ONEDNN_BF16 or not torch.is_autocast_enabled("cpu")))
    return rows if applies else 0


def _as_image(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``... x C`` -> the channels-last ``1 x C x 1 x rows`` view a 1 x 1 conv reads."""
    return x.reshape(1, 1, rows, x.shape[-1]).permute(0, 3, 1, 2)


def _from_image(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 1 x 1 conv's ``1 x C' x 1 x rows`` output -> ``... x C'`` in the shape of ``x``."""
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], out.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; on the CPU, large products go through oneDNN as a 1 x 1 convolution.

    PyTorch's CPU builds send fp32 ``linear``/``matmul`` to MKL's sgemm, which on AMD CPUs
    runs at about half the speed of oneDNN's kernels (this machine, AMD EPYC: 174-198 vs
    330-437 GFLOP/s on the encoders' shapes; ``benchmarks/gemm.py``).
    A ``... x C`` tensor viewed as a channels-last ``1 x C x 1 x rows`` image is a 1 x 1
    convolution's input as it is: no copies, fp32 throughout, gradients as usual.
    """
    rows = _onednn_rows(x)
    if not rows:
        return F.linear(x, weight, bias)
    return _from_image(F.conv2d(_as_image(x, rows), weight[:, :, None, None], bias), x)


# oneDNN convolution with an element-wise post-op: PyTorch's own CPU fusion kernel (what
# torch.compile's CPU backend emits), present in builds with oneDNN.
_CONV_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.gelu(linear(x, weight, bias))`` (exact, erf GELU). At inference on the CPU oneDNN
    applies the GELU while writing the product (one pass less over an output that is 4x the
    input in a ViT MLP), in fp32 or in the autocast dtype."""
    rows = _onednn_rows(x)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if (not rows or _CONV_POINTWISE is None or torch.is_grad_enabled()
            or dtype not in (torch.float32, torch.bfloat16)):
        return F.gelu(linear(x, weight, bias))
    out = _CONV_POINTWISE(_as_image(x.to(dtype), rows), weight.to(dtype)[:, :, None, None],
                          bias.to(dtype), [0, 0], [1, 1], [1, 1], 1, "gelu", [None], "none")
    return _from_image(out, x)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a ``B x C x H x W`` tensor (ConvNeXt style)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalising in channels-last lets the fused layer_norm kernel do the work.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """Transformer feed-forward block: ``lin2(act(lin1(x)))``."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = Linear(embedding_dim, mlp_dim)
        self.lin2 = Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.act, nn.GELU) and self.act.approximate == "none":
            return self.lin2(linear_gelu(x, self.lin1.weight, self.lin1.bias))
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """Plain ReLU MLP with ``num_layers`` linear layers (hypernetwork heads, IoU head)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
