"""samkit's CPU kernels: products routed to oneDNN where PyTorch's default route is slow on
CPU (measured in ``benchmarks/gemm.py``), with the plain PyTorch route everywhere else
(GPUs, export, compile, small or strided inputs). Modules use them through
:class:`samkit.modeling.common.Linear` and friends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
