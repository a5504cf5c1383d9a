"""Argument checks shared by every public entry point.

Every check runs before any kernel does and raises TypeError or ValueError with
a message that names the argument, the expected value and the actual one.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_input(x: object, in_channels: int, name: str = "x") -> torch.Tensor:
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():
        # Symbolic tracing: nothing to check until the graph runs. jit.trace: the example
        # input runs, and Python comparisons of traced sizes would only warn.
        return x  # type: ignore[return-value]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must be 4-D (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{name} must have {in_channels} channels (dim 1), got {x.shape[1]} "
            f"in shape {tuple(x.shape)}"
        )
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(
            f"{name} must have a spatial size of at least 1x1, got "
            f"{x.shape[2]}x{x.shape[3]} in shape {tuple(x.shape)}"
        )
    return x


def check_same_dtype_device(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    """Weights must live where x lives and share its dtype: no silent casts."""
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


def check_out(out: object, shape: tuple[int, ...], x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != x.dtype or out.device != x.device:
        raise TypeError(f"out must be {x.dtype} on {x.device}, got {out.dtype} on {out.device}")
    if not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("out must be contiguous in torch.channels_last memory format")
