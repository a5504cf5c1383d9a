"""A one-entry cache keyed on tensors' identity of storage and version counter."""

from __future__ import annotations

from typing import Callable, Generic, Sequence, TypeVar

import torch

V = TypeVar("V")


def tracing() -> bool:
    """True under torch.compile/torch.export and torch.jit.trace. There a cache must not be
    used: traced tensors have no storage to key on, and a cached tensor would be frozen
    into the trace as a constant that ignores later weight updates. The folding and
    packing are traced into the graph instead (where inductor's freezing can fold them)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class TensorVersionCache(Generic[V]):
    """Rebuilds its value when any source tensor is written in place or replaced.

    The key holds a detached alias of each source, which keeps the old storage
    alive: an equal data_ptr therefore means the same storage, never a new tensor
    that happens to reuse freed memory. In-place writes bump the shared version
    counter (optimizer.step, load_state_dict, anything under no_grad). Writes
    through `.data` do not: call `clear()` after those.
    """

    def __init__(self) -> None:
        self._key: list[tuple[torch.Tensor, int, int]] | None = None
        self._value: V | None = None

    def get(self, sources: Sequence[torch.Tensor], build: Callable[[], V]) -> V:
        if self._key is None or len(self._key) != len(sources) or any(
            t.data_ptr() != ptr or t._version != version or t.shape != alias.shape or t.dtype != alias.dtype
            for t, (alias, ptr, version) in zip(sources, self._key)
        ):
            self._value = build()
            self._key = [(t.detach(), t.data_ptr(), t._version) for t in sources]
        return self._value  # type: ignore[return-value]

    def __deepcopy__(self, memo: dict) -> "TensorVersionCache[V]":
        # A copied module has tensors of its own: the copy starts empty (a copied key would
        # only point at the original's storage), and copying never duplicates packed weights.
        return type(self)()

    def clear(self) -> None:
        self._key, self._value = None, None
