"""Training a fused GoogLeNet (the paper's, and torchvision's with BN) follows the reference model's loss curve."""

import copy

import pytest
import torch

import inception_fast as ifast
from inception_fast.models import googlenet_paper

from conftest import needs_cpu_kernel, rel_err


def sgd_curve(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int = 20) -> list[float]:
    """The losses of `steps` SGD steps (momentum 0.9) on one batch; each step re-seeds, so
    two models draw the same dropout masks."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    curve = []
    for step in range(steps):
        torch.manual_seed(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


@needs_cpu_kernel
@pytest.mark.slow
def test_twenty_sgd_steps_follow_the_reference_loss_curve():
    ref = googlenet_paper(num_classes=10, aux_logits=False).train()
    fused = ifast.swap_inception(copy.deepcopy(ref), backend="cpu")
    assert sum(isinstance(m, ifast.FusedInception) for m in fused.modules()) == 9
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    ref_curve, fused_curve = (sgd_curve(model, x, y, lr=0.05) for model in (ref, fused))
    assert fused_curve[-1] < 0.5 * fused_curve[0]  # it really trains
    # Per-step gradients agree to ~1e-6 (fp32, another summation order than MKL/oneDNN);
    # twenty momentum steps on a memorisation task contract rather than amplify that. 1e-3
    # relative per step leaves room for other BLAS builds, and still catches any wrong
    # gradient term, which moves the curve by percents within a few steps.
    for step, (a, b) in enumerate(zip(ref_curve, fused_curve)):
        assert abs(a - b) <= 1e-3 * abs(a) + 1e-6, f"step {step}: reference {a}, fused {b}"


@needs_cpu_kernel
def test_twenty_sgd_steps_of_torchvision_googlenet_with_bn_track_eager(monkeypatch):
    """torchvision's GoogLeNet, BN in train mode, on the train-mode BN form (every block, by
    bn_train_min_pixels=0: these grids are small): each step's loss stays with eager's and
    the model learns. In float64: in float32 the trajectories of this memorisation task
    are chaotic, since a ReLU output within rounding of 0 moves a max pool's argmax, and
    eager float32 itself left eager float64's curve by up to 29% within 20 steps (batch 8,
    96x96, lr 0.01). Each step's float32 gradients are held to 1e-5 per block in
    test_bn_train.py."""
    from torchvision.models import googlenet

    from inception_fast.fused_graph import FusedBranchGraph

    monkeypatch.setattr(FusedBranchGraph, "bn_train_min_pixels", 0)
    torch.manual_seed(0)
    ref = googlenet(weights=None, aux_logits=False, init_weights=True, num_classes=10).train().double()
    fused = ifast.swap_inception(copy.deepcopy(ref), backend="cpu")
    assert sum(isinstance(m, FusedBranchGraph) for m in fused.modules()) == 9
    x, y = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.randint(0, 10, (4,))
    ref_curve, fused_curve = (sgd_curve(model, x, y, lr=0.02) for model in (ref, fused))
    assert fused_curve[-1] < 0.5 * fused_curve[0]
    for step, (a, b) in enumerate(zip(ref_curve, fused_curve)):
        assert abs(a - b) <= 1e-8 * abs(a), f"step {step}: eager {a}, fused {b}"
    buffers = dict(fused.named_buffers())
    for name, want in ref.named_buffers():
        got = buffers[name]
        assert rel_err(got, want) <= 1e-8 if want.is_floating_point() else torch.equal(got, want), name
