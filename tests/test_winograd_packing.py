"""The one-pass C++ Winograd packer (csrc/pack_winograd.cpp, torch.ops.inception_fast.pack_winograd_cpu),
which backend.pack_winograd takes where no gradient flows through the packing (training
repacks every step), against the differentiable ATen path that builds the same panels;
and pack_winograd_flipped, the data gradient's packing of the flipped, transposed weight."""

import pytest
import torch

from conftest import needs_cpu_kernel
from inception_fast.ops import backend

pytestmark = needs_cpu_kernel

# (cout, cin, kh, kw, tile): every filter Winograd runs, channels off the 32-lane panels.
FILTERS = [(70, 17, 3, 3, 2), (70, 17, 3, 3, 4), (33, 8, 1, 7, 2), (9, 40, 7, 1, 2), (64, 3, 1, 3, 2),
           (5, 64, 3, 1, 2), (1, 1, 3, 3, 4), (40, 13, 5, 5, 2)]


def _aten(w: torch.Tensor, tile: int) -> torch.Tensor:
    """pack_winograd's ATen path: taken when the packing is differentiated."""
    return backend.pack_winograd(w.detach().clone().requires_grad_(), 32, tile=tile).detach()


@pytest.mark.parametrize("cout, cin, kh, kw, tile", FILTERS)
def test_one_pass_packing_matches_the_aten_path(cout, cin, kh, kw, tile):
    """Both sum U in float64 and round once: the 3x3s' panels come out bit-identical; F(2, 7),
    F(2, 3) and F(2x2, 5x5) sum their taps in another order, so a few values may differ by one ulp."""
    w = torch.randn(cout, cin, kh, kw)
    with torch.no_grad():
        got = backend.pack_winograd(w, 32, tile=tile)
    want = _aten(w, tile)
    assert got.shape == want.shape and got.dtype == torch.float32
    if (kh, kw) == (3, 3):
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, rtol=2 ** -23, atol=0)
        assert (got != want).sum() <= max(1, want.numel() // 1000)


@pytest.mark.parametrize("cout, cin, kh, kw, tile", FILTERS)
def test_flipped_packing_is_the_packing_of_the_flipped_transposed_weight(cout, cin, kh, kw, tile):
    w = torch.randn(cout, cin, kh, kw)
    got = backend.pack_winograd_flipped(w, 32, tile)
    want = _aten(w.flip(2, 3).transpose(0, 1), tile)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=2 ** -23, atol=0)


def test_strided_weights_and_the_differentiable_path():
    """A non-contiguous weight packs as its contiguous copy; with a gradient wanted the ATen
    path runs (the C++ op has no autograd formula), and its gradient reaches the weight."""
    w = torch.randn(40, 24, 3, 3)[::2, 1::2]
    assert torch.equal(backend.pack_winograd(w, 32, tile=2), backend.pack_winograd(w.contiguous(), 32, tile=2))
    wr = w.clone().requires_grad_()
    packed = backend.pack_winograd(wr, 32, tile=2)
    assert packed.grad_fn is not None
    packed.sum().backward()
    assert wr.grad is not None and wr.grad.abs().sum() > 0


@pytest.mark.parametrize("bad, match", [
    (lambda w, t: (w.double(), t, 32, False), "float32"),
    (lambda w, t: (w, t[:, :4], 32, False), r"\(positions, 9\) float64"),
    (lambda w, t: (w, t.float(), 32, False), "float64"),
    (lambda w, t: (w, t, 65, False), "width must be"),
    (lambda w, t: (w[0], t, 32, False), "cout, cin, kh, kw"),
])
def test_bad_arguments_raise(bad, match):
    w, t = torch.randn(8, 4, 3, 3), backend._transform_tensor(3, 3, 2)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.inception_fast.pack_winograd_cpu(*bad(w, t))
