"""The drop-in contract, as a conformance table: fused module kinds x user actions.

Each case builds the original (a one-block model), swaps a deep copy with
swap_inception, does the same thing to both, and asserts equal results; where the
fused kernel cannot honour an action, it asserts that the swap refused the block (with
a log line) or that the fused module ran the original.
"""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inception_fast as ifast
from inception_fast._dropin import DropInBlock

from conftest import needs_cpu_kernel, randomize_, reference_module, rel_err, small_residual_block, small_v3_block

pytestmark = needs_cpu_kernel

SPEC = ifast.InceptionSpec(8, 4, 4, 6, 2, 4, 4)


def googlenet_bn() -> nn.Module:
    from torchvision.models.googlenet import Inception

    return randomize_(Inception(8, 4, 4, 6, 2, 4, 4)).eval()


KINDS = {
    "googlenet-bn": googlenet_bn,  # torchvision's block: BasicConv2d = conv + BN + ReLU
    "googlenet-plain": lambda: reference_module(SPEC),  # the paper's conv + bias + ReLU
    "v3": lambda: small_v3_block("A", 8),  # torchvision's InceptionA
    "residual": small_residual_block,  # Inception-ResNet's form: no pool branch, then act(x + s * 1x1(concat))
    # A lone stem unit (swap_inception(convs=True)): torchvision's BasicConv2d, an unpadded 3x3 over x.
    "stem": lambda: _stem_unit(),
}


def _stem_unit() -> nn.Module:
    from torchvision.models.inception import BasicConv2d

    return randomize_(BasicConv2d(8, 6, kernel_size=3)).eval()


@pytest.fixture(params=list(KINDS))
def pair(request):
    """(original one-block model, swapped deep copy), fp64, eval mode."""
    original = nn.Sequential(KINDS[request.param]()).double().eval()
    swapped = ifast.swap_inception(copy.deepcopy(original), convs=request.param == "stem")
    assert isinstance(swapped[0], DropInBlock)
    return original, swapped


def _x(*, dtype=torch.float64, batch=3):
    return torch.randn(batch, 8, 5, 5, dtype=dtype)


def _same(a, b, tol=1e-10):
    assert rel_err(a, b) <= tol


def _each_bn(models, change):
    """Apply change(bn) to every BatchNorm2d of every model: the same edit to both sides."""
    for model in models:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                change(m)


# -- values and memory formats ------------------------------------------------------


def test_nchw_in_gives_contiguous_nchw_out_and_view_works(pair):
    original, swapped = pair
    x = _x()
    with torch.no_grad():
        y = swapped(x)
    assert y.is_contiguous()
    _same(y.view(y.size(0), -1), original(x).view(y.size(0), -1))


def test_channels_last_in_gives_channels_last_out(pair):
    original, swapped = pair
    x = _x().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = swapped(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    _same(y, original(x))


def test_non_contiguous_input(pair):
    original, swapped = pair
    x = torch.randn(3, 16, 5, 9, dtype=torch.float64)[:, ::2, :, ::2]
    with torch.no_grad():
        _same(swapped(x), original(x))


# -- autograd ----------------------------------------------------------------------


def _grads(model, x, grad_out):
    model.zero_grad()
    x = x.clone().requires_grad_()
    model(x).backward(grad_out)
    return x.grad, {n: p.grad for n, p in model.named_parameters()}


def test_backward_for_x_and_every_parameter(pair):
    original, swapped = pair
    x = _x()
    grad_out = torch.randn_like(original(x))
    (dx0, g0), (dx1, g1) = _grads(original, x, grad_out), _grads(swapped, x, grad_out)
    _same(dx1, dx0)
    assert g0.keys() == g1.keys()
    for name in g0:
        if g0[name] is None:
            assert g1[name] is None, name
        else:
            _same(g1[name], g0[name])


def test_requires_grad_on_a_subset_of_parameters(pair):
    original, swapped = pair
    for model in (original, swapped):
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("weight") and "conv" in name and "branch" in name and "1" in name)
    x = _x()
    grad_out = torch.randn_like(original(x))
    (_, g0), (_, g1) = _grads(original, x, grad_out), _grads(swapped, x, grad_out)
    for name in g0:
        assert (g0[name] is None) == (g1[name] is None), name
        if g0[name] is not None:
            _same(g1[name], g0[name])


def _same_buffers(original, swapped):
    """Running statistics as the tolerance table's fp64 row (the train-mode BN form sums in
    another order than ATen), num_batches_tracked exactly."""
    for (n, b0), (_, b1) in zip(original.named_buffers(), swapped.named_buffers()):
        if b0.is_floating_point():
            assert rel_err(b1, b0) <= 1e-12, n
        else:
            assert torch.equal(b0, b1), n


def test_train_eval_switches_update_running_stats_the_same(pair):
    original, swapped = pair
    x = _x()
    for mode in (True, False, True, False):
        original.train(mode), swapped.train(mode)
        with torch.no_grad():
            _same(swapped(x), original(x))
    _same_buffers(original, swapped)


# -- copies and state --------------------------------------------------------------


def test_deepcopy_pickle_and_state_dict_round_trip(pair):
    original, swapped = pair
    x = _x()
    with torch.no_grad():
        want = original(x)
        _same(copy.deepcopy(swapped)(x), want)
        buffer = io.BytesIO()
        torch.save(swapped, buffer)
        buffer.seek(0)
        _same(torch.load(buffer, weights_only=False)(x), want)
        fresh = nn.Sequential(copy.deepcopy(original[0]))
        randomize_(fresh)
        swapped.load_state_dict(fresh.state_dict())
        _same(swapped(x), fresh(x))


def test_a_pickled_model_loads_in_a_process_whose_plan_table_differs(pair, monkeypatch):
    """The module reaches its plan by an id into a per-process table (one dynamo guard); a
    model saved whole and loaded elsewhere must find its own plan, not that id's there."""
    from inception_fast import fused_graph

    original, swapped = pair
    x = _x()
    buffer = io.BytesIO()
    torch.save(swapped, buffer)
    # A fresh process: a table that knows only some other plan.
    monkeypatch.setattr(fused_graph, "_PLAN_TABLE", {})
    fused_graph._plan_id([0, 1, 2], [3])
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        _same(loaded(x), original(x))


@needs_cpu_kernel
def test_a_running_profiler_sees_the_operator_without_grad_too():
    """The eager no-grad path skips the operator's Python autograd kernel, except under a
    profiler: a user's trace names the fused op whatever the grad mode."""
    fused = ifast.FusedBranchGraph.from_module(small_v3_block("B", 7), backend="cpu").eval()
    x = torch.randn(2, 7, 5, 5)
    for grad in (False, True):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
                torch.set_grad_enabled(grad):
            fused(x.clone().requires_grad_(grad))
        ops = {e.key for e in prof.key_averages() if e.key.startswith("inception_fast::")}
        assert ops & {"inception_fast::graph_forward", "inception_fast::graph_forward_saving"}, (grad, ops)


def test_a_fused_block_runs_on_the_meta_device():
    """Shapes without data (profile's meta mode, deferred init): the op's fake kernel."""
    fused = ifast.FusedBranchGraph.from_module(small_v3_block("B", 7), backend="cpu").eval().to("meta")
    y = fused(torch.empty(2, 7, 5, 5, device="meta"))
    assert y.is_meta and tuple(y.shape) == (2, 487, 2, 2)


def test_a_plan_id_names_its_plan_in_every_process():
    """Content-derived: the same plan gets the same id in a fresh process (a cached compiled
    graph guarded on the id finds that plan), and different plans get different ids."""
    import subprocess
    import sys

    from inception_fast import fused_graph

    fused = ifast.FusedBranchGraph.from_module(small_v3_block("B", 7), backend="cpu")
    other = ifast.FusedBranchGraph.from_module(small_v3_block("A", 9), backend="cpu")
    assert fused._plan_id != other._plan_id
    code = (f"from inception_fast.fused_graph import _plan_id; "
            f"print(_plan_id({fused._flat_plan!r}, {fused._backward_plan!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout) == fused._plan_id
    assert fused_graph._PLAN_TABLE[fused._plan_id] == (fused._flat_plan, fused._backward_plan)


def test_plan_ids_stay_one_per_plan_under_threads():
    """Blocks built or unpickled in threads: two plans must never share an id."""
    import sys
    import threading

    from inception_fast import fused_graph

    wrong = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible

    def work(t):
        for i in range(500):
            plan = [-1 - t, i, 7]  # no real plan starts with a negative buffer count
            if fused_graph._PLAN_TABLE[fused_graph._plan_id(plan, [t])][0] != plan:
                wrong.append((t, i))

    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong


# -- hooks and reparametrisations --------------------------------------------------


def _first_conv_path(model):
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def test_hook_added_after_the_swap_fires_and_is_honoured(pair):
    original, swapped = pair
    x = _x()
    name = _first_conv_path(original)
    fired = []

    def double(module, args, out):
        fired.append(module)
        return out * 2

    for model in (original, swapped):
        model.get_submodule(name).register_forward_hook(double)
    with torch.no_grad():
        _same(swapped(x), original(x))
    assert len(fired) == 2


@pytest.mark.parametrize("guarded", [False, True], ids=["dynamo-default", "hook-guards"])
def test_under_compile_a_hook_added_later_is_seen_as_by_the_compiled_original(pair, guarded):
    """torch.compile guards nn.Module hooks only with skip_nnmodule_hook_guards=False: by
    default a hook added after compiling is not seen by the compiled original, and neither by
    the compiled swapped model (whose hook checks dynamo evaluates once, when it traces, not
    as ~5 guards per submodule); with the guards, both retrace and run it. A child replaced
    after compiling still raises (that stays guarded)."""
    original, swapped = pair
    x = _x()
    name = _first_conv_path(original)
    fired = {id(original): 0, id(swapped): 0}
    outputs = {}
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=not guarded), torch.no_grad():
        for model in (original, swapped):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="eager")
            compiled(x)

            def double(module, args, out, key=id(model)):
                fired[key] += 1
                return out * 2

            model.get_submodule(name).register_forward_hook(double)
            outputs[id(model)] = compiled(x)
    _same(outputs[id(swapped)], outputs[id(original)])
    assert fired[id(swapped)] == fired[id(original)] == (1 if guarded else 0)
    block = swapped[0]
    child_name, child = next(iter(block.named_children()))
    torch._dynamo.reset()
    compiled = torch.compile(swapped, backend="eager")
    with torch.no_grad():
        compiled(x)
        setattr(block, child_name, copy.deepcopy(child))
        with pytest.raises(RuntimeError, match=f"submodule '{child_name}' .* was replaced after the swap"):
            compiled(x)


@pytest.mark.parametrize("guarded", [False, True], ids=["dynamo-default", "hook-guards"])
def test_under_compile_a_global_hook_added_later_fires_as_on_the_compiled_original(pair, guarded):
    """dynamo does not guard global module hooks, whatever skip_nnmodule_hook_guards says: one
    registered after compiling fires on the compiled model's outer module only. The swapped
    model's blocks read them at trace time too, so the same calls happen (they did not: with
    the hook guards on, the swapped model recompiled and ran its original branches, 25 calls
    against 1)."""
    calls = {}
    x = _x()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=not guarded), torch.no_grad():
        for name, model in zip(("original", "swapped"), pair):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="eager")
            compiled(x)
            fired = calls[name] = []
            handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o, f=fired: f.append(type(m)))
            try:
                compiled(x)
            finally:
                handle.remove()
    assert len(calls["swapped"]) == len(calls["original"])


def test_global_module_hook_is_honoured(pair):
    original, swapped = pair
    x = _x()
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m)))
    try:
        with torch.no_grad():
            _same(swapped(x), original(x))
    finally:
        handle.remove()
    assert calls.count(nn.Conv2d) == 2 * sum(isinstance(m, nn.Conv2d) for m in original.modules())


@pytest.mark.parametrize("where", ["block", "inner conv"])
def test_swap_refuses_a_block_with_hooks(where, caplog):
    model = nn.Sequential(googlenet_bn())
    target = model[0] if where == "block" else model[0].branch2[1].conv
    target.register_forward_pre_hook(lambda m, a: None)
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert not isinstance(model[0], DropInBlock)
    assert "forward hook" in caplog.text


def test_pruned_net_trains_the_same_as_the_original(caplog):
    """prune.l1_unstructured works through a forward pre-hook: the swap must refuse the block
    (a fused kernel would read weight_orig, not weight_orig * mask)."""
    from torch.nn.utils import prune

    def net():
        torch.manual_seed(0)
        return nn.Sequential(ifast.ReferenceInception(SPEC), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(18, 3))

    original, candidate = net(), net()
    for model in (original, candidate):
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                prune.l1_unstructured(m, "weight", 0.3)
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        swapped = ifast.swap_inception(candidate)
    assert "left 0" in caplog.text and "forward hook" in caplog.text
    x, target = torch.randn(3, 8, 5, 5), torch.tensor([0, 2, 1])
    losses = []
    for model in (original, swapped):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trace = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses.append(trace)
    assert losses[0] == losses[1]


def test_parametrization_added_after_the_swap_is_honoured(pair):
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, w):
            return w * 0.5

    original, swapped = pair
    name = _first_conv_path(original)
    for model in (original, swapped):
        parametrize.register_parametrization(model.get_submodule(name), "weight", Scale())
    x = _x()
    with torch.no_grad():
        _same(swapped(x), original(x))


def test_swap_refuses_weight_norm(caplog):
    model = nn.Sequential(reference_module(SPEC))
    torch.nn.utils.parametrizations.weight_norm(model[0].branch1.conv)
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert not isinstance(model[0], DropInBlock) and "parametrization" in caplog.text


def test_a_child_replaced_after_the_swap_raises(pair):
    _, swapped = pair
    name, child = next(iter(swapped[0].named_children()))
    setattr(swapped[0], name, copy.deepcopy(child))
    with pytest.raises(RuntimeError, match=f"submodule '{name}' .* was replaced after the swap"):
        swapped(_x())


# -- recognition by computation ----------------------------------------------------


def _leaky_basic_conv():
    from torchvision.models.googlenet import BasicConv2d

    class LeakyConv(BasicConv2d):
        def forward(self, x):
            return F.leaky_relu(self.bn(self.conv(x)), 0.1)

    return LeakyConv


@pytest.mark.parametrize("kind", ["googlenet", "v3"])
def test_a_subclassed_unit_with_another_activation_is_not_fused(kind, caplog):
    from torchvision.models.googlenet import Inception
    from torchvision.models.inception import InceptionA

    conv = _leaky_basic_conv()
    block = Inception(8, 4, 4, 6, 2, 4, 4, conv_block=conv) if kind == "googlenet" else InceptionA(8, 8, conv_block=conv)
    model = nn.Sequential(randomize_(block).eval())
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert not isinstance(model[0], DropInBlock)
    assert "leaky_relu" in caplog.text


def test_a_subclassed_block_that_overrides_forward_is_not_fused(caplog):
    from torchvision.models.googlenet import Inception

    class Doubled(Inception):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(randomize_(Doubled(8, 4, 4, 6, 2, 4, 4)).eval())
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert not isinstance(model[0], DropInBlock) and "unfused" in caplog.text


def test_self_check_catches_what_structure_cannot_see(monkeypatch, caplog):
    """A fused kernel that computed something else would be caught at swap time by the
    always-on numeric check: here the folding is sabotaged."""
    from inception_fast import fused_graph

    real = fused_graph.fold_conv_bn
    monkeypatch.setattr(fused_graph, "fold_conv_bn", lambda unit: tuple(
        t * 1.1 if i == 0 else t for i, t in enumerate(real(unit))))
    model = nn.Sequential(googlenet_bn())
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert not isinstance(model[0], DropInBlock) and "differs from the original" in caplog.text


def test_swap_does_not_move_the_global_random_stream():
    model = nn.Sequential(googlenet_bn())
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    ifast.swap_inception(model)
    assert isinstance(model[0], DropInBlock) and torch.equal(torch.rand(3), want)


# -- autocast ----------------------------------------------------------------------


def test_cpu_autocast_bf16(pair):
    original, swapped = pair
    original.float(), swapped.float()
    x = _x(dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = original(x), swapped(x)
    # bf16 out of a concat; float32 out of a residual tail (x + bf16 conv promotes), on both sides.
    assert got.dtype == want.dtype
    assert rel_err(got, want) <= 2e-2


# -- torch.func --------------------------------------------------------------------


def test_per_sample_gradients_with_vmap_of_grad(pair):
    from torch.func import functional_call, grad, vmap

    original, swapped = pair
    x = _x()
    results = []
    for model in (original, swapped):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, xi, model=model):
            return functional_call(model, (p, buffers), (xi[None],)).square().sum()

        results.append(vmap(grad(loss), in_dims=(None, 0))(params, x))
    for name in results[0]:
        _same(results[1][name], results[0][name])


def test_vmap_and_jvp_of_the_forward(pair):
    from torch.func import jvp, vmap

    original, swapped = pair
    x = _x()
    tangent = torch.randn_like(x)
    _same(vmap(swapped)(x[:, None]), vmap(original)(x[:, None]))
    _same(jvp(swapped, (x,), (tangent,))[1], jvp(original, (x,), (tangent,))[1])


# -- FX, TorchScript, export, ONNX ---------------------------------------------------


def test_fx_symbolic_trace_and_feature_extraction(pair):
    from torchvision.models.feature_extraction import create_feature_extractor

    original, swapped = pair
    x = _x()
    with torch.no_grad():
        _same(torch.fx.symbolic_trace(swapped)(x), original(x))
        features = create_feature_extractor(swapped, {"0": "f"})(x)["f"]
        _same(features, original(x))
    assert not swapped.training  # the extractor's train/eval tracing leaves the mode alone


def test_jit_trace_keeps_the_fused_op_and_round_trips(pair):
    original, swapped = pair
    x = _x()
    with torch.no_grad():
        traced = torch.jit.trace(swapped, x)  # check_trace on: the re-trace must agree
        # Every block records its custom op (differentiable through its registered autograd).
        assert "inception_fast::graph_forward" in str(traced.inlined_graph)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        y = _x()  # another input: the trace is not a constant
        _same(loaded(y), original(y))


def test_jit_trace_with_autograd_is_differentiable(pair):
    original, swapped = pair
    x = _x()
    traced = torch.jit.trace(swapped, x)
    grad_out = torch.randn_like(original(x))
    (dx0, g0), (dx1, _) = _grads(original, x, grad_out), _grads(traced, x, grad_out)
    _same(dx1, dx0)


def test_jit_script_runs_the_original(pair, caplog):
    original, swapped = pair
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        scripted = torch.jit.script(swapped)
    assert "torch.jit.script runs the original" in caplog.text
    x = _x()
    with torch.no_grad():
        _same(scripted(x), original(x))


def test_torch_export(pair):
    original, swapped = pair
    x = _x()
    program = torch.export.export(swapped, (x,))
    y = _x()
    with torch.no_grad():
        _same(program.module()(y), original(y))


def test_compile_fullgraph(pair):
    """One graph (fullgraph: a break raises) and no recompile on later calls of the same
    shape (error_on_recompile: one raises): no Python cache check guards the forward."""
    original, swapped = pair
    torch._dynamo.reset()
    compiled = torch.compile(swapped, fullgraph=True)
    x = _x()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            _same(compiled(x), original(x))


@needs_cpu_kernel
def test_compile_dynamic_backward_through_the_winograd_packing():
    """torch.compile(dynamic=True) of a swapped fp32 block, backward included: its 3x3s and
    5x5 are packed for Winograd inside the graph (the weight transform, a matmul with a
    constant), and dx and every parameter's gradient match eager's. The transform was a
    custom autograd.Function, whose backward dynamo could not trace with dynamic shapes
    (an AssertionError from its SubgraphTracer where the original compiles)."""
    torch._dynamo.reset()
    original = small_v3_block("A", 16)  # 3x3s and a 48 -> 64 5x5
    swapped = ifast.swap_inception(nn.Sequential(copy.deepcopy(original)))
    compiled = torch.compile(swapped, backend="aot_eager", dynamic=True)
    xs = [torch.randn(2, 16, 9, 9).requires_grad_() for _ in range(2)]
    xs[1].data.copy_(xs[0].data)
    y0, y1 = original(xs[0]), compiled(xs[1])
    grad = torch.randn_like(y0)
    y0.backward(grad)
    y1.backward(grad)
    assert rel_err(y1, y0) <= 1e-5 and rel_err(xs[1].grad, xs[0].grad) <= 1e-5
    for (name, p0), p1 in zip(original.named_parameters(), swapped.parameters()):
        assert rel_err(p1.grad, p0.grad) <= 1e-5, name


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_runs_in_onnxruntime(pair, dynamo, tmp_path):
    if dynamo:
        pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    original, swapped = pair
    original.float(), swapped.float()
    x = _x(dtype=torch.float32)
    path = tmp_path / "block.onnx"
    torch.onnx.export(swapped, (x,), str(path), dynamo=dynamo, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), original(x)) <= 1e-5


# -- what a review broke, kept broken-proof ------------------------------------------


def test_bn_in_train_mode_inside_an_eval_block_uses_batch_statistics(pair):
    """BN adaptation: the model in eval, its BNs in train mode (batch statistics, running
    stats updated). A folded kernel cannot do that: the train-mode BN form or the original."""
    original, swapped = pair
    _each_bn((original, swapped), lambda bn: bn.train())
    x = _x()
    with torch.no_grad():
        _same(swapped(x), original(x))
    _same_buffers(original, swapped)


def test_train_mode_with_frozen_bns_runs_fused(monkeypatch):
    """The converse, as in detection fine-tuning: a train-mode block whose BNs are all in eval
    mode folds exactly, so it runs the fused kernel."""
    block = small_v3_block("A", 8)
    fused = ifast.swap_inception(nn.Sequential(copy.deepcopy(block)))[0]
    fused.train()
    _each_bn((fused,), lambda bn: bn.eval())
    monkeypatch.setattr(DropInBlock, "_run_original", lambda self, x: pytest.fail("the original ran"))
    x = torch.randn(2, 8, 5, 5)
    _same(fused(x), block(x), tol=1e-5)


def test_bns_switched_to_batch_statistics_after_the_swap(pair):
    def batch_statistics(bn):
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None

    original, swapped = pair
    _each_bn((original, swapped), batch_statistics)
    x = _x()
    with torch.no_grad():
        _same(swapped(x), original(x))


def test_bn_eps_changed_after_the_first_call(pair):
    original, swapped = pair
    x = _x()
    with torch.no_grad():
        swapped(x)
        _each_bn((original, swapped), lambda bn: setattr(bn, "eps", 0.25))
        _same(swapped(x), original(x))


def test_conv_geometry_changed_after_the_swap_raises(pair):
    _, swapped = pair
    conv = next(m for m in swapped.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    conv.padding = (0, 0) if conv.padding != (0, 0) else (1, 1)  # the stem's unpadded 3x3 gains padding
    with pytest.raises(RuntimeError, match="stride, padding, dilation or groups changed after the swap"):
        swapped(_x())


def test_a_train_mode_branch_in_python_is_not_frozen_by_tracing(caplog):
    class Halves(ifast.ReferenceInception):
        def forward(self, x):
            out = super().forward(x)
            if self.training:
                out = out * 0.5
            return out

    model = nn.Sequential(randomize_(Halves(SPEC)).eval())
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert not isinstance(model[0], DropInBlock) and "train mode than in eval mode" in caplog.text


def test_forward_mode_ad_outside_torch_func(pair):
    import torch.autograd.forward_ad as fwAD

    original, swapped = pair
    x, tangent = _x(), torch.randn(3, 8, 5, 5, dtype=torch.float64)
    results = []
    for model in (original, swapped):
        model.requires_grad_(False)
        with fwAD.dual_level():
            results.append(fwAD.unpack_dual(model(fwAD.make_dual(x, tangent))).tangent)
    _same(results[1], results[0])


def test_a_shallow_copy_raises_instead_of_reading_the_source_weights(pair):
    _, swapped = pair
    replica = swapped[0]._replicate_for_data_parallel()  # what nn.DataParallel does per device
    with pytest.raises(RuntimeError, match="copied without its submodules being re-bound"):
        replica(_x())


def test_inference_mode(pair):
    original, swapped = pair
    x = _x()
    with torch.inference_mode():
        _same(swapped(x), original(x))
    y = _x().requires_grad_()  # and autograd still works after
    swapped(y).sum().backward()
    assert y.grad is not None


def test_inplace_op_on_the_output_under_autograd(pair):
    original, swapped = pair
    x = _x().contiguous(memory_format=torch.channels_last)
    outs = []
    for model in (original, swapped):
        x_ = x.clone().requires_grad_()
        y = model(x_)
        y.mul_(2).relu_()
        try:
            y.sum().backward()
        except RuntimeError as exc:  # a residual block ends in ReLU, whose backward needs its output
            assert "modified by an inplace operation" in str(exc)
            outs.append(None)
        else:
            outs.append(x_.grad)
    if outs[0] is not None:  # where the original allows it, the swapped block gives the same gradient
        _same(outs[1], outs[0])


def test_fake_tensor_mode_does_not_poison_the_cache(pair):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    original, swapped = pair
    x = _x()
    with torch.no_grad():
        with FakeTensorMode(allow_non_fake_inputs=True):
            swapped(x)
        y = swapped(x)
    assert not isinstance(y, FakeTensor)
    with torch.no_grad():
        _same(y, original(x))


def test_bn_kept_in_fp32_inside_a_bf16_model():
    model = nn.Sequential(googlenet_bn()).to(torch.bfloat16)
    _each_bn((model,), lambda bn: bn.float())
    x = torch.randn(2, 8, 5, 5, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
        swapped = ifast.swap_inception(copy.deepcopy(model))
        assert rel_err(swapped(x), want) <= 2e-2


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_autocast_with_an_explicit_backend(backend):
    original = nn.Sequential(googlenet_bn())
    swapped = ifast.swap_inception(copy.deepcopy(original), backend=backend)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(swapped(x), original(x)) <= 2e-2


def test_wrong_input_dtype_names_the_argument(pair):
    _, swapped = pair
    with pytest.raises(TypeError, match="x's dtype"):
        swapped(_x(dtype=torch.float32))
