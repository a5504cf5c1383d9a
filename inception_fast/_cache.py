"""A one-entry cache keyed on tensors' identity of storage and version counter."""

from __future__ import annotations

from typing import Callable, Generic, Sequence, TypeVar

import torch

V = TypeVar("V")


def tracing() -> bool:
    """True under torch.compile/torch.export and torch.jit.trace. There a cache must not be
    used: traced tensors have no storage to key on, and a cached tensor would be frozen
    into the trace as a constant that ignores later weight updates. The folding and
    packing are traced into the graph instead (where inductor's freezing can fold them).
    Under any TorchDispatchMode too (FakeTensorMode, FlopCounterMode): a value built
    there may be a fake tensor, which must never reach a later real call."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0


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
        self._extra: tuple = ()
        self._value: V | None = None

    def get(self, sources: Sequence[torch.Tensor], build: Callable[[], V], extra: tuple = ()) -> V:
        """The cached value, rebuilt first when a source changed or `extra` (plain values the
        value depends on, such as a BN's eps) differs from the last call's."""
        if any(t.is_inference() for t in sources):  # inference tensors have no version counter
            return build()
        if self._key is None or self._extra != extra or len(self._key) != len(sources) or any(
            t.data_ptr() != ptr or t._version != version or t.shape != alias.shape or t.dtype != alias.dtype
            for t, (alias, ptr, version) in zip(sources, self._key)
        ):
            # Built as normal tensors even under torch.inference_mode: a cached value is read
            # again outside it, and keys on its version counter.
            with torch.inference_mode(False):
                self._value = build()
            self._key = [(t.detach(), t.data_ptr(), t._version) for t in sources]
            self._extra = extra
        return self._value  # type: ignore[return-value]

    def __deepcopy__(self, memo: dict) -> "TensorVersionCache[V]":
        # A copied module has tensors of its own: the copy starts empty (a copied key would
        # only point at the original's storage), and copying never duplicates packed weights.
        return type(self)()

    def clear(self) -> None:
        self._key, self._value = None, None
