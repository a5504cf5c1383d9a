"""The fused op as a torch.library custom op: profiler counting, torch.export, torch.compile."""

import copy

import pytest
import torch

import inception_fast as ifast
from inception_fast.models import googlenet_paper

from conftest import TOLERANCE, needs_cpu_kernel, reference_module, rel_err

pytestmark = needs_cpu_kernel
SPEC = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)


def test_fused_cpu_model_profiles_to_the_same_macs_as_the_original():
    original = googlenet_paper(aux_logits=False).eval()
    fused = ifast.swap_inception(googlenet_paper(aux_logits=False).eval(), backend="cpu")
    want = {r.name: r.macs for r in ifast.profile(original, (2, 3, 224, 224)).rows}
    got = {r.name: r.macs for r in ifast.profile(fused, (2, 3, 224, 224)).rows}
    assert got == want


def test_torch_export_captures_the_custom_op():
    ref = reference_module(SPEC)
    fused = ifast.FusedInception.from_module(ref, backend="cpu").eval()
    x = torch.randn(2, 13, 5, 5)
    with torch.no_grad():
        program = torch.export.export(fused, (x,))
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert "inception_fast.graph_forward.default" in targets
        assert rel_err(program.module()(x), ref(x)) <= TOLERANCE[torch.float32]


@pytest.mark.slow
def test_compile_fullgraph_inference_of_a_fused_googlenet():
    original = googlenet_paper(aux_logits=False).eval()
    fused = ifast.swap_inception(googlenet_paper(aux_logits=False).eval(), backend="cpu")
    fused.load_state_dict(original.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        compiled = torch.compile(fused, fullgraph=True)  # fullgraph: any graph break raises
        assert rel_err(compiled(x), original(x)) <= 1e-4


@pytest.mark.slow
def test_compile_fullgraph_training_step_matches_eager_autograd():
    ref = reference_module(SPEC).train()
    fused = ifast.FusedInception.from_module(copy.deepcopy(ref), backend="cpu").train()
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 13, 5, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(2, SPEC.out_channels, 5, 5)
    compiled(x).backward(grad_out)
    ref(x_ref).backward(grad_out)
    assert rel_err(x.grad, x_ref.grad) <= TOLERANCE[torch.float32]
    for p, q in zip(fused.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= TOLERANCE[torch.float32]
