import pytest

import inception_fast as ifast
from inception_fast.traffic import traffic


def test_hand_counted_tiny_block():
    # 1 pixel, 1 byte per element: x 4, out 4 (1+1+1+1), weights = params.
    spec = ifast.InceptionSpec(4, 1, 2, 1, 3, 1, 1, k3=1, k5=1)
    t = traffic(spec, 1, 1, batch=1, bytes_per_element=1)
    assert t.minimum == 4 + spec.params().total + 4
    assert t.fused == t.minimum + 2 * (2 + 3)
    branch = 1 + 2 + 1 + 3 + 1 + 1
    assert t.eager == 4 * 4 + spec.params().total + 3 * branch + (2 + 3) + 2 * 4 + 4 + 4


@pytest.mark.parametrize("name", list(ifast.GOOGLENET_INCEPTION))
@pytest.mark.parametrize("batch", [1, 256])
def test_fused_moves_less_than_eager_and_no_less_than_the_minimum(name, batch):
    block = ifast.GOOGLENET_INCEPTION[name]
    t = traffic(block.spec, block.size, block.size, batch)
    assert t.minimum < t.fused < t.eager
    # Activations dominate at batch 256: the ratio is set by t3, t5 against x and out.
    if batch == 256:
        s = block.spec
        expected = 1 + 2 * (s.ch3x3red + s.ch5x5red) / (s.in_channels + s.out_channels)
        assert t.fused_ratio == pytest.approx(expected, rel=0.02)


def test_a_lone_unpadded_convolution_counts_its_smaller_output_and_no_concat():
    """A stem's lone 5x5 unpadded unit: x (2 x 8 x 9 x 9), out on the 5x5 grid; eager is the
    convolution (reads x, writes out) and its in-place ReLU (reads and writes out): no pool,
    no concat."""
    from inception_fast.spec import Branch, BranchGraphSpec, Conv

    spec = BranchGraphSpec(8, (Branch(((Conv(8, 6, 5, 5, padded=False),),)),), None, None)
    t = traffic(spec, 9, 9, batch=2, bytes_per_element=4)
    x, out, weights = 2 * 81 * 8 * 4, 2 * 25 * 6 * 4, (25 * 8 + 1) * 6 * 4
    assert t.minimum == t.fused == x + weights + out
    assert t.eager == weights + x + 3 * out
