"""Loads the compiled CPU kernels (csrc/) once, and remembers why if it could not."""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root "
    "(needs a C++20 compiler and ninja), or run `make demo`"
)


_LOADED: tuple[ModuleType | None, str | None] | None = None


def _load() -> tuple[ModuleType | None, str | None]:
    # A plain memo, not functools.lru_cache: resolve_backend runs inside torch.compile'd
    # forwards, and dynamo warns on every lru_cache-wrapped call it traces.
    global _LOADED
    if _LOADED is None:
        try:
            import torch  # noqa: F401  (the extension links against libtorch: load it first)

            from . import _C  # type: ignore[attr-defined]
        except ImportError as exc:
            _LOADED = None, f"{type(exc).__name__}: {exc}"
        else:
            _LOADED = _C, None
    return _LOADED


def cpu_extension() -> ModuleType | None:
    """The compiled module, or None when it is missing or failed to load."""
    return _load()[0]


def cpu_extension_error() -> str | None:
    return _load()[1]


def require_cpu_extension() -> ModuleType:
    module, error = _load()
    if module is None:
        raise RuntimeError(
            f"backend='cpu' needs the compiled inception_fast._C extension, which could not be "
            f"loaded ({error}); {_BUILD_HINT}. backend='reference' runs without it."
        )
    return module


@functools.lru_cache(maxsize=1)
def warn_cpu_fallback() -> None:
    """Warn once per process that backend='auto' fell back to the reference backend."""
    warnings.warn(
        f"inception_fast: the C++ CPU kernel is unavailable ({cpu_extension_error()}); "
        f"backend='auto' falls back to 'reference' (plain PyTorch ops). To fix: {_BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )
