"""The fused forward of every CPU-capable backend against an fp64 ReferenceInception."""

import os

import pytest
import torch

import inception_fast as ifast
from conftest import (
    AWKWARD_SIZES,
    AWKWARD_SPECS,
    TOLERANCE,
    assert_special_values_propagate,
    needs_cpu_kernel,
    reference_module,
    rel_err,
    run_poisoned,
    weights_of,
)

BACKEND_DTYPES = [
    pytest.param("cpu", torch.float32, marks=needs_cpu_kernel, id="cpu-fp32"),
    pytest.param("cpu", torch.float64, marks=needs_cpu_kernel, id="cpu-fp64"),
    pytest.param("reference", torch.float32, id="reference-fp32"),
]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("size", AWKWARD_SIZES)
@pytest.mark.parametrize("spec", AWKWARD_SPECS)
def test_awkward_shapes_match_fp64_reference(spec, size, backend, dtype):
    n, h, w = size
    ref = reference_module(spec).double()
    x = torch.randn(n, spec.in_channels, h, w, dtype=torch.float64)
    want = ref(x)
    got = run_poisoned(x.to(dtype), weights_of(ref, dtype), backend)
    assert not torch.isnan(got).any()
    assert rel_err(got, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_googlenet_3a_block(backend, dtype):
    block = ifast.GOOGLENET_INCEPTION["3a"]
    ref = reference_module(block.spec).double()
    x = torch.randn(2, 192, 28, 28, dtype=torch.float64)
    fused = ifast.FusedInception.from_module(ref, backend=backend).to(dtype)
    with torch.no_grad():
        got = fused(x.to(dtype))
    ref.double()
    assert got.is_contiguous()  # NCHW in, NCHW out, as the original block
    assert rel_err(got, ref(x)) <= TOLERANCE[dtype]


@needs_cpu_kernel
@pytest.mark.parametrize(
    "layout",
    ["nchw", "channels_last", "channel-slice", "spatial-stride"],
)
def test_any_input_layout(layout):
    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    ref = reference_module(spec)
    base = torch.randn(2, 2 * spec.in_channels, 9, 18)
    x = {
        "nchw": base[:, :13, :, :9].contiguous(),
        "channels_last": base[:, :13, :, :9].contiguous(memory_format=torch.channels_last),
        "channel-slice": base[:, 5:18, :, :9],
        "spatial-stride": base[:, :13, :, ::2],
    }[layout]
    fused = ifast.FusedInception.from_module(ref, backend="cpu")
    with torch.no_grad():
        assert rel_err(fused(x), ref(x)) <= TOLERANCE[torch.float32]


@needs_cpu_kernel
@pytest.mark.parametrize(
    "name, batch",
    # Each schedule of the kernel: image groups (4a, N=4), row blocks (4a, N=3), column
    # parts (5b, N=1); one thread always runs image groups.
    [("4a", 4), ("4a", 3), ("5b", 1)],
)
def test_thread_count_does_not_change_a_single_bit(name, batch):
    block = ifast.GOOGLENET_INCEPTION[name]
    fused = ifast.FusedInception.from_module(reference_module(block.spec), backend="cpu")
    x = torch.randn(batch, block.spec.in_channels, block.size, block.size)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                results.append(fused(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


# x rows of 1024 fp32, 512 fp64 or 2048 bf16 channels lie a multiple of 4 KB apart: the
# kernel copies their K chunks into a packed A and pools them at a padded stride (csrc/gemm.h
# set_conflicting). 9 images of 8x8 (and of 20x20) run image-major in uneven groups, the
# 20x20 ones with an empty group on 2 threads; 1 image runs stage-major with column parts.
@needs_cpu_kernel
@pytest.mark.parametrize("size", [(1, 5, 5), (9, 8, 8), (9, 20, 20)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("dtype, channels", [(torch.float32, 1024), (torch.float64, 512), (torch.bfloat16, 2048)],
                         ids=["fp32-1024", "fp64-512", "bf16-2048"])
def test_4k_row_strides_and_uneven_image_groups(dtype, channels, pool, size):
    from inception_fast.ops.branch_graph import graph_forward, pack_weights
    from inception_fast.ops.plan import plan
    from inception_fast.spec import Branch, BranchGraphSpec, Conv
    from test_graph_backward import _eager, _params

    spec = BranchGraphSpec(channels, (Branch(((Conv(channels, 40),),)),
                                      Branch(((Conv(channels, 8),), (Conv(8, 16, 3, 3),)))), pool, Conv(channels, 24))
    weights, biases = _params(spec, torch.float64)
    x = torch.randn(size[0], channels, *size[1:], dtype=torch.float64)
    graph = plan(spec)
    packed = pack_weights(graph, [w.to(dtype) for w in weights], [b.to(dtype) for b in biases], "cpu")
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append(graph_forward(x.to(dtype), *packed, graph.flat()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1])
    assert rel_err(got[1], _eager(spec, x, weights, biases)) <= TOLERANCE[dtype]


@needs_cpu_kernel
def test_batch_zero_gives_an_empty_output():
    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    fused = ifast.FusedInception.from_module(reference_module(spec), backend="cpu")
    y = fused(torch.randn(0, 13, 5, 5))
    assert y.shape == (0, spec.out_channels, 5, 5)


@needs_cpu_kernel
def test_nan_and_inf_propagate_like_the_reference():
    assert_special_values_propagate("cpu")


@needs_cpu_kernel
def test_cpu_backend_rejects_integer_input():
    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    fused = ifast.FusedInception(spec, backend="cpu")
    with pytest.raises(TypeError, match="floating dtype"):
        fused(torch.ones(1, 13, 4, 4, dtype=torch.int32))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="checks the message without the interpreter")
def test_triton_backend_on_cpu_names_the_fix():
    fused = ifast.FusedInception(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6), backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fused(torch.randn(1, 13, 4, 4))


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda w: w._replace(w3=w.w3[:, :-1]), ValueError, "w3 must have shape"),
        (lambda w: w._replace(b5=w.b5[:-1]), ValueError, "b5 must have shape"),
        (lambda w: w._replace(wp=w.wp.double()), TypeError, "wp must have x's dtype"),
        (lambda w: w._replace(w5=w.w5[:, :, :4, :4]), ValueError, "odd"),
        (lambda w: w._replace(b1=w.b1[None]), ValueError, "b1 must be 1-D"),
    ],
)
def test_functional_rejects_bad_weights_before_running(change, error, words):
    weights = change(weights_of(reference_module(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6))))
    with pytest.raises(error, match=words):
        ifast.inception(torch.randn(1, 13, 5, 5), *weights)


def test_functional_rejects_unknown_backend_and_bad_out():
    weights = weights_of(reference_module(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)))
    x = torch.randn(1, 13, 5, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        ifast.inception(x, *weights, backend="cuda")
    with torch.no_grad():
        with pytest.raises(ValueError, match="out must have shape"):
            ifast.inception(x, *weights, out=torch.empty(1, 30, 5, 5))
        with pytest.raises(ValueError, match="channels_last"):
            ifast.inception(x, *weights, out=torch.empty(1, 31, 5, 5))


def test_missing_extension_falls_back_once_and_cpu_backend_explains(monkeypatch):
    from inception_fast import _extension

    monkeypatch.setattr(_extension, "_load", lambda: (None, "ImportError: simulated missing build"))
    _extension.warn_cpu_fallback.cache_clear()
    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    ref = reference_module(spec)
    x = torch.randn(1, 13, 5, 5)
    with pytest.warns(RuntimeWarning, match="simulated missing build") as record:
        with torch.no_grad():
            for _ in range(3):
                y = ifast.FusedInception.from_module(ref)(x)
    assert len(record) == 1
    assert rel_err(y, ref(x)) <= TOLERANCE[torch.float32]
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        ifast.FusedInception.from_module(ref, backend="cpu")(x)
    _extension.warn_cpu_fallback.cache_clear()


@needs_cpu_kernel
@pytest.mark.parametrize("winograd", [True, False], ids=["winograd", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_packed_panels_are_contiguous(dtype, winograd):
    """pack_weights hands the kernel contiguous panels for every GEMM (1x1, 3x3, 5x5, 1x7,
    over x and over buffers): the kernel makes a contiguous copy of any other on every call.
    A 1x1's panels once came out as a strided view (the reshape needed no copy), and that
    per-call copy cost Inception-v3 11% at batch 1."""
    from inception_fast.ops.branch_graph import pack_weights
    from inception_fast.ops.plan import plan
    from inception_fast.spec import Branch, BranchGraphSpec, Conv

    spec = BranchGraphSpec(48, (Branch(((Conv(48, 40),),)), Branch(((Conv(48, 24),), (Conv(24, 36, 3, 3),))),
                                Branch(((Conv(48, 32),), (Conv(32, 40, 5, 5),))),
                                Branch(((Conv(48, 16),), (Conv(16, 20, 1, 7),)))), "max", Conv(48, 24))
    graph = plan(spec)
    weights = [torch.randn(c.out_channels, c.in_channels, c.kh, c.kw, dtype=dtype) for c in spec.convs]
    biases = [torch.randn(c.out_channels, dtype=dtype) for c in spec.convs]
    b, bias = pack_weights(graph, weights, biases, "cpu", winograd=winograd)
    assert {(g.kh, g.kw) for g in graph.gemms} >= {(1, 1), (3, 3), (5, 5), (1, 7)}
    assert all(t.is_contiguous() for t in b) and all(t.is_contiguous() for t in bias)
