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
        value depends on, such as a BN's eps) differs from the last call's.

        A hit costs two attribute reads per source (~0.15 us each): this runs on every
        forward of a fused block. Storage and version counter suffice: a new storage is a
        new data_ptr (the key's aliases keep the old ones alive), and every in-place write,
        set_ and resize_ bump the version; only `.data =` assignments get past both.
        """
        key = self._key
        if key is not None and self._extra == extra and len(key) == len(sources):
            try:
                for t, (_, ptr, version) in zip(sources, key):
                    if t._version != version or t.data_ptr() != ptr:
                        break
                else:
                    return self._value  # type: ignore[return-value]
            except RuntimeError:  # an inference tensor: it has no version counter to key on
                return build()
        if any(t.is_inference() for t in sources):
            return build()
        # Built as normal tensors even under torch.inference_mode: a cached value is read
        # again outside it, and keys on its version counter. inference_mode(False) turns
        # grad mode on (whatever the caller's no_grad): no_grad inside it, so that the value
        # holds no autograd graph (it held the BN fold's saved tensors, and packed weights
        # that required grad).
        with torch.inference_mode(False), torch.no_grad():
            self._value = build()
        self._key = [(t.detach(), t.data_ptr(), t._version) for t in sources]
        self._extra = extra
        return self._value

    def __deepcopy__(self, memo: dict) -> "TensorVersionCache[V]":
        # A copied module has tensors of its own: the copy starts empty (a copied key would
        # only point at the original's storage), and copying never duplicates packed weights.
        return type(self)()

    def clear(self) -> None:
        self._key, self._value = None, None
