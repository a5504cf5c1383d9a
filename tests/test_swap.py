"""swap_inception and verify on real models."""

import copy
import logging

import pytest
import torch
import torchvision

import inception_fast as ifast
from inception_fast.models import googlenet_paper

from conftest import needs_cpu_kernel, randomize_, rel_err


def torchvision_googlenet():
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    return randomize_(model).eval()


@needs_cpu_kernel
def test_torchvision_googlenet_all_nine_blocks_within_1e4(caplog):
    original = torchvision_googlenet()
    with caplog.at_level(logging.INFO, logger="inception_fast"):
        swapped = ifast.swap_inception(copy.deepcopy(original), backend="cpu")
    fused = [n for n, m in swapped.named_modules() if isinstance(m, ifast.FusedInception)]
    assert len(fused) == 9
    assert "swapped 9 block(s)" in caplog.text
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(swapped(x), original(x)) <= 1e-4
    report = ifast.verify(original, swapped, x)
    assert report.ok and len(report.blocks) == 9


@needs_cpu_kernel
def test_paper_googlenet_swaps_and_aux_heads_still_train():
    original = randomize_(googlenet_paper()).eval()
    swapped = ifast.swap_inception(copy.deepcopy(original), backend="cpu")
    assert sum(isinstance(m, ifast.FusedInception) for m in swapped.modules()) == 9
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(swapped(x), original(x)) <= 1e-4
    swapped.train()
    out = swapped(torch.randn(2, 3, 224, 224))
    assert len(out) == 3 and all(o.shape == (2, 1000) for o in out)
    ifast.models.googlenet_loss(out, torch.tensor([1, 2])).backward()
    assert swapped.inception4a.branch2[1].conv.weight.grad is not None


def test_state_dict_round_trips_between_original_and_swapped():
    original = torchvision_googlenet()
    swapped = ifast.swap_inception(copy.deepcopy(original))
    assert swapped.state_dict().keys() == original.state_dict().keys()
    fresh = torchvision_googlenet()
    fresh.load_state_dict(swapped.state_dict())
    swapped.load_state_dict(fresh.state_dict())


def test_models_without_inception_blocks_are_untouched(caplog):
    model = torchvision.models.resnet18(weights=None)
    before = repr(model)
    with caplog.at_level(logging.INFO, logger="inception_fast"):
        assert ifast.swap_inception(model) is model
    assert repr(model) == before
    assert "swapped 0 block(s)" in caplog.text


def test_unsupported_block_is_left_alone_with_a_reason(caplog):
    model = torch.nn.Sequential(ifast.ReferenceInception(ifast.InceptionSpec(8, 4, 4, 4, 4, 4, 4)))
    model[0].branch3[1].conv.stride = (2, 2)
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert isinstance(model[0], ifast.ReferenceInception)
    assert "left 0 (ReferenceInception) unfused" in caplog.text and "stride" in caplog.text


def test_repr_after_swap_names_the_fused_blocks():
    model = ifast.swap_inception(torchvision_googlenet())
    text = repr(model)
    assert text.count("FusedInception(") == 9 and "from=Inception" in text


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ifast.swap_inception("googlenet")
    with pytest.raises(ValueError, match="backend must be one of"):
        ifast.swap_inception(torch.nn.Linear(2, 2), backend="gpu")
