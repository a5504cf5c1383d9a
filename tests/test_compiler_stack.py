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


def test_cpu_kernels_are_cpp_operators():
    """TORCH_LIBRARY (csrc/bindings.cpp) defines the ops, so that a process without our Python
    code can call them by name (an AOTInductor package); the Python side only adds fake
    kernels, autograd and FLOP formulas (opcheck: tests/test_graph_backward.py)."""
    for name in ("graph_forward", "graph_forward_saving", "graph_backward_cpu"):
        dump = torch._C._dispatch_dump(f"inception_fast::{name}")
        defined_at = next(line for line in dump.splitlines() if line.startswith("debug: registered at"))
        assert "bindings.cpp" in defined_at, dump


_WITHOUT_EXTENSION = """
import importlib.abc, sys
class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "inception_fast._C":
            raise ImportError("simulated: not built")
sys.meta_path.insert(0, NoExtension())
import warnings
import torch
import inception_fast as ifast
spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
ref = ifast.ReferenceInception(spec, batch_norm=True).eval()
x = torch.randn(2, 13, 5, 5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fused = ifast.FusedInception.from_module(ref).eval()
    with torch.no_grad():
        assert (fused(x) - ref(x)).abs().max() < 1e-5
assert any("falls back to 'reference'" in str(w.message) for w in caught), [str(w.message) for w in caught]
flat = fused._flat_plan
meta = torch.ops.inception_fast.graph_forward(x.to("meta"), [], [], flat)  # the fake kernel
assert tuple(meta.shape) == (2, spec.out_channels, 5, 5)
try:
    torch.ops.inception_fast.graph_forward(x, [], [], flat)
except RuntimeError as exc:
    assert "inception_fast._C extension" in str(exc) and "pip install" in str(exc), exc
else:
    raise AssertionError("the CPU operator ran without its kernel")
print("OK")
"""


def test_without_the_extension_the_operators_exist_and_say_why_they_cannot_run():
    """A failed C++ build: the same op names (fake kernels, tracing), backend='auto' on the
    reference path with a warning, and a direct CPU call raises with the build hint."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr


_LOAD_PACKAGE = """
import sys
import torch
import inception_fast  # registers the CPU operators the package calls by name
saved = torch.load(sys.argv[2])
runner = torch._inductor.aoti_load_package(sys.argv[1])
with torch.no_grad():
    got = runner(saved["x"])
print(((got - saved["want"]).norm() / saved["want"].norm()).item())
"""


def _tiny_net() -> torch.nn.Module:
    from torchvision.models.googlenet import Inception

    from conftest import randomize_

    return randomize_(torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), Inception(16, 8, 4, 8, 4, 8, 8),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))).eval()


@pytest.mark.parametrize("model", ["tiny", pytest.param("googlenet", marks=pytest.mark.slow)])
def test_aoti_package_of_a_swapped_model_runs_in_a_fresh_process(model, tmp_path):
    """torch.export -> aoti_compile_and_package -> aoti_load_package in another process: the
    package calls inception_fast::graph_forward through the dispatcher and matches the
    eager original."""
    import subprocess
    import sys

    import torchvision

    from conftest import randomize_

    original = _tiny_net() if model == "tiny" else randomize_(
        torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)).eval()
    swapped = ifast.swap_inception(copy.deepcopy(original))
    x = torch.randn(2, 3, 16, 16) if model == "tiny" else torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = original(x)
        program = torch.export.export(swapped, (x,))
    assert "inception_fast.graph_forward.default" in {str(n.target) for n in program.graph.nodes}
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    done = subprocess.run([sys.executable, "-c", _LOAD_PACKAGE, package, str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-5


@pytest.mark.slow  # make test: tests/test_dropin.py::test_compile_fullgraph, eval mode, one block
# -convs: its conv2, conv3 fused too; paper: the paper's GoogLeNet (no BN, so "train" runs fused)
@pytest.mark.parametrize("model", ["tiny", "googlenet", "googlenet-convs", "inception_v3", "paper"])
@pytest.mark.parametrize("train", [False, True, "fused"], ids=["eval", "train", "train-fused"])
def test_compiled_swapped_model_is_one_graph_without_recompiles(model, train, monkeypatch):
    """fullgraph=True (a graph break raises) and error_on_recompile (a recompile raises) over
    three calls of one input shape: no Python cache check guards the compiled forward. In
    train mode with BN these grids are under bn_train_min_pixels, so the blocks run their
    original branches; "train-fused" sets it to 0, and every block runs the train-mode BN
    form's custom ops (graph_bn_train) in the graph."""
    import torchvision

    from conftest import randomize_
    from inception_fast.fused_graph import FusedBranchGraph

    # The fused form in float64: through a whole network of BNs over a few values per
    # channel, fp32 rounding alone moved the output by 1.5e-4 (inception_v3's at 80 x 80,
    # whose last grids are 1 x 1: by 0.1, eager against itself compiled).
    dtype, tol = ((torch.float64, 1e-9) if train == "fused" or (train and model == "inception_v3")
                  else (torch.float32, 1e-4))
    if train == "fused":
        monkeypatch.setattr(FusedBranchGraph, "bn_train_min_pixels", 0)
        train = True

    make = {"tiny": _tiny_net,
            "googlenet": lambda: torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False),
            "inception_v3": lambda: torchvision.models.inception_v3(weights=None, aux_logits=False,
                                                                    init_weights=False),
            "paper": lambda: googlenet_paper(aux_logits=False)}
    original = randomize_(make[model.removesuffix("-convs")]()).eval()
    original.to(dtype).train(train)
    for m in original.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # train mode: a random mask would differ between the two models
    swapped = ifast.swap_inception(copy.deepcopy(original), convs=model == "googlenet-convs")
    # googlenet's conv1 is a 7x7/2: it stays eager
    fused = {"tiny": 1, "googlenet": 9, "googlenet-convs": 11, "inception_v3": 11, "paper": 9}[model]
    assert sum(isinstance(m, (ifast.FusedInception, ifast.FusedBranchGraph)) for m in swapped.modules()) == fused
    size = {"tiny": 16, "inception_v3": 80}.get(model, 64)  # inception_v3 takes 75 x 75 and up
    x = torch.randn(2, 3, size, size).to(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(swapped, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            with torch.set_grad_enabled(train):
                got = compiled(x)
            if train:
                got.sum().backward()
    with torch.set_grad_enabled(train):
        want = original(x)  # train mode: batch statistics, so the running stats do not matter
    assert rel_err(got, want) <= tol
