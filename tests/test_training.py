"""Training a fused GoogLeNet follows the reference model's loss curve."""

import copy

import pytest
import torch

import inception_fast as ifast
from inception_fast.models import googlenet_paper

from conftest import needs_cpu_kernel


@needs_cpu_kernel
@pytest.mark.slow
def test_twenty_sgd_steps_follow_the_reference_loss_curve():
    ref = googlenet_paper(num_classes=10, aux_logits=False).train()
    fused = ifast.swap_inception(copy.deepcopy(ref), backend="cpu")
    assert sum(isinstance(m, ifast.FusedInception) for m in fused.modules()) == 9
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    curves = []
    for model in (ref, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        curve = []
        for step in range(20):
            torch.manual_seed(step)  # the same dropout masks for both models
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(curve)
    ref_curve, fused_curve = curves
    assert fused_curve[-1] < 0.5 * fused_curve[0]  # it really trains
    # Per-step gradients agree to ~1e-6 (fp32, another summation order than MKL/oneDNN);
    # twenty momentum steps on a memorisation task contract rather than amplify that. 1e-3
    # relative per step leaves room for other BLAS builds, and still catches any wrong
    # gradient term, which moves the curve by percents within a few steps.
    for step, (a, b) in enumerate(zip(ref_curve, fused_curve)):
        assert abs(a - b) <= 1e-3 * abs(a) + 1e-6, f"step {step}: reference {a}, fused {b}"
