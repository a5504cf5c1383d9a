import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import inception_fast as ifast
from inception_fast.spec import BranchCounts


def test_table_has_the_nine_paper_blocks_in_order():
    assert list(ifast.GOOGLENET_INCEPTION) == ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
    # Each block's input is the previous block's output, except across the max pools.
    names = list(ifast.GOOGLENET_INCEPTION)
    for prev, nxt in zip(names, names[1:]):
        assert ifast.GOOGLENET_INCEPTION[nxt].spec.in_channels == ifast.GOOGLENET_INCEPTION[prev].spec.out_channels


def test_slices_tile_the_output_in_concat_order():
    spec = ifast.GOOGLENET_INCEPTION["4e"].spec
    covered = []
    for s in spec.branch_slices:
        covered.extend(range(s.start, s.stop))
    assert covered == list(range(spec.out_channels))
    assert spec.slice3x3.stop - spec.slice3x3.start == spec.ch3x3
    assert spec.reduce_channels == spec.ch1x1 + spec.ch3x3red + spec.ch5x5red


@pytest.mark.parametrize("name", list(ifast.GOOGLENET_INCEPTION))
def test_analytic_macs_equal_flop_counter(name):
    block = ifast.GOOGLENET_INCEPTION[name]
    module = ifast.ReferenceInception(block.spec)
    x = torch.randn(2, block.spec.in_channels, block.size, block.size)
    with FlopCounterMode(display=False) as counter:
        module(x)
    assert block.spec.macs(block.size, block.size, batch=2).total == counter.get_total_flops() // 2


@pytest.mark.parametrize("batch_norm", [False, True])
def test_analytic_params_equal_module_params(batch_norm):
    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6, k5=3)
    module = ifast.ReferenceInception(spec, batch_norm=batch_norm)
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = sum(c.weight.numel() for c in convs)
    if batch_norm:  # BN replaces the conv bias
        assert sum(p.numel() for p in module.parameters()) == weights + 2 * sum(c.out_channels for c in convs)
    else:
        assert sum(p.numel() for p in module.parameters()) == spec.params().total
    assert isinstance(spec.params(), BranchCounts)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(in_channels=0), ValueError, "in_channels"),
        (dict(ch3x3=-4), ValueError, "ch3x3"),
        (dict(pool_proj=2.0), TypeError, "pool_proj"),
        (dict(ch1x1=True), TypeError, "ch1x1"),
        (dict(k3=4), ValueError, "k3"),
        (dict(k5=0), ValueError, "k5"),
    ],
)
def test_bad_spec_fields_name_the_argument(kwargs, error, words):
    fields = dict(in_channels=8, ch1x1=4, ch3x3red=4, ch3x3=4, ch5x5red=4, ch5x5=4, pool_proj=4)
    fields.update(kwargs)
    with pytest.raises(error, match=words):
        ifast.InceptionSpec(**fields)


def test_macs_rejects_bad_sizes():
    spec = ifast.GOOGLENET_INCEPTION["3a"].spec
    with pytest.raises(ValueError, match="height"):
        spec.macs(0, 28)
    with pytest.raises(ValueError, match="batch"):
        spec.macs(28, 28, batch=-1)


def test_pool_index_places_the_pool_branch_in_the_concat():
    from inception_fast.ops.plan import plan

    branches = (ifast.Branch(((ifast.Conv(4, 2),),)), ifast.Branch(((ifast.Conv(4, 3),), (ifast.Conv(3, 5, 3, 3),))))
    last = ifast.BranchGraphSpec(4, branches, "max", ifast.Conv(4, 6))
    assert last.out_offsets() == ((0, 2), 7)
    assert ifast.BranchGraphSpec(4, branches, "max", ifast.Conv(4, 6), pool_index=2) == last  # one spelling of last
    first = ifast.BranchGraphSpec(4, branches, "max", ifast.Conv(4, 6), pool_index=0)
    assert first.out_offsets() == ((6, 8), 0) and first.out_channels == last.out_channels == 13
    assert first.convs == last.convs  # the pool projection stays last in weight order
    graph = plan(first)
    assert [c.channel for c in graph.convs if c.destination < 0] == [6, 8, 0]
    reduction = ifast.BranchGraphSpec(4, (ifast.Branch(((ifast.Conv(4, 2, 3, 3, 2),),)),), "max", None, stride=2,
                                      pool_index=0)
    assert plan(reduction).pool_copy_channel == 0 and reduction.out_offsets() == ((4,), 0)
    for bad in (-1, 3, True, 1.0):
        with pytest.raises(ValueError, match="pool_index"):
            ifast.BranchGraphSpec(4, branches, "max", ifast.Conv(4, 6), pool_index=bad)
