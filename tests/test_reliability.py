"""Edge cases of use: threads, inference mode, dtypes, and distributed training."""

import socket
import threading

import pytest
import torch

import inception_fast as ifast

from conftest import TOLERANCE, needs_cpu_kernel, reference_module, rel_err

SPEC = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)


@needs_cpu_kernel
def test_four_threads_on_one_module_match_serial_runs():
    fused = ifast.FusedInception.from_module(reference_module(ifast.GOOGLENET_INCEPTION["4a"].spec), backend="cpu")
    inputs = [torch.randn(2, 480, 14, 14) for _ in range(4)]
    with torch.no_grad():
        serial = [fused(x) for x in inputs]
    results = [None] * 4

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = fused(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(serial, results):
        assert torch.equal(want, got)


@needs_cpu_kernel
def test_inference_mode_and_no_grad_with_grad_requiring_input():
    ref = reference_module(SPEC)
    fused = ifast.FusedInception.from_module(ref, backend="cpu")
    x = torch.randn(2, 13, 5, 5, requires_grad=True)
    with torch.inference_mode():
        y = fused(x)
    assert rel_err(y, ref(x)) <= TOLERANCE[torch.float32]
    with torch.no_grad():
        y = fused(x)
    assert not y.requires_grad


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.bool])
def test_non_floating_inputs_are_rejected(dtype):
    with pytest.raises(TypeError, match="floating"):
        ifast.FusedInception(SPEC)(torch.zeros(1, 13, 4, 4, dtype=dtype))


def _ddp_worker(rank, world, port, result_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from inception_fast.models import googlenet_paper

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = ifast.swap_inception(googlenet_paper(num_classes=10, aux_logits=False), backend="cpu")
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    torch.manual_seed(100 + rank)  # different data per rank
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"losses": losses, "params": flat}, f"{result_path}.{rank}")
    dist.destroy_process_group()


@needs_cpu_kernel
@pytest.mark.slow
def test_ddp_two_processes_train_a_fused_googlenet(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = str(tmp_path / "rank")
    mp.spawn(_ddp_worker, args=(2, port, result), nprocs=2, join=True)
    r0, r1 = torch.load(f"{result}.0"), torch.load(f"{result}.1")
    assert all(map(lambda v: v == v and abs(v) < 1e3, r0["losses"] + r1["losses"]))
    # DDP all-reduces the gradients: both replicas end with the same weights.
    torch.testing.assert_close(r0["params"], r1["params"])
    assert r0["losses"] != r1["losses"]  # they did see different data


def test_weights_on_another_device_are_rejected_before_running():
    from conftest import weights_of

    weights = weights_of(reference_module(SPEC))
    meta = weights._replace(w3=weights.w3.to("meta"))  # a second device without a GPU
    with pytest.raises(ValueError, match="w3 must be on x's device cpu, got meta"):
        ifast.inception(torch.randn(1, 13, 5, 5), *meta)


@needs_cpu_kernel
@pytest.mark.parametrize("n, h, w, c, pad", [
    (20_000, 28, 28, 192, 0),   # 3a's input at batch 20k: 3.0e9 elements
    (90_000, 7, 7, 832, 0),     # 5b's input: 3.7e9
    (40_000, 28, 28, 96, 1),    # 3a's zero-bordered t3: (28 + 2)^2 * 96 per image
    (1_000_000, 14, 14, 48, 2),  # 4e-sized t5, 2^40 and beyond
])
def test_cpu_kernel_pixel_offsets_do_not_overflow_past_2_to_the_31(n, h, w, c, pad):
    """The C++ kernels address NHWC planes through one helper; check it where int32 would wrap."""
    from inception_fast._extension import require_cpu_extension

    ext = require_cpu_extension()
    wp = w + 2 * pad
    stride_w, stride_h, stride_n = c, wp * c, (h + 2 * pad) * wp * c
    for img, row, col in [(n - 1, h - 1, w - 1), (n - 1, 0, 0), (n - 1, h // 2, w // 2)]:
        want = img * stride_n + (row + pad) * stride_h + (col + pad) * stride_w
        assert want > 2**31 - 1
        assert ext.pixel_offset(stride_n, stride_h, stride_w, pad, img, row, col) == want


def _graph_op_case(block: str):
    """(x, packed b, packed bias, flat plan) of a GoogLeNet-style block or torchvision's
    InceptionB (a grid reduction with the max-pool copy)."""
    if block == "googlenet":
        fused = ifast.FusedInception.from_module(reference_module(SPEC)).eval()
        x = torch.randn(2, 13, 5, 5)
    else:
        from torchvision.models.inception import InceptionB

        fused = ifast.FusedBranchGraph.from_module(InceptionB(24).eval()).eval()
        x = torch.randn(2, 24, 9, 9)
    b, bias = fused._packed("cpu")
    return x, list(b), list(bias), list(fused._flat_plan)


def _edit(flat, **values):
    flat = list(flat)
    for key, value in values.items():
        flat[int(key[1:])] = value
    return flat


# Malformed plans and arguments for the C++ operator, each of which once crashed, hung or
# returned memory the kernel never wrote (found by fuzzing). Indices into GraphPlan.flat()
# of the two blocks of _graph_op_case; every one must now raise.
BAD_CALLS = {
    "stride-1 GEMM writes a stride-2 output": ("inception_b", lambda x, b, bias, f: (x, b, bias, _edit(f, i20=-1))),
    "max-pool copy past the output": ("inception_b", lambda x, b, bias, f: (x, b, bias, _edit(f, i5=503))),
    "max-pool copy segment moved": ("inception_b", lambda x, b, bias, f: (x, b, bias, _edit(f, i74=1, i77=481))),
    "channel offset overflows": ("googlenet", lambda x, b, bias, f: (x, b, bias, _edit(f, i21=2**63 - 1))),
    "huge border": ("inception_b", lambda x, b, bias, f: (x, b, bias, _edit(f, i3=2**63 - 1))),
    "negative kernel and border": ("googlenet", lambda x, b, bias, f: (
        x, [b[0], b[1][:, :7].contiguous(), *b[2:]], bias, _edit(f, i3=-1, i33=-1, i34=-1, i36=-1, i37=-1))),
    "negative kernel": ("googlenet", lambda x, b, bias, f: (x, b, bias, _edit(f, i33=-1, i34=-1))),
    "kernel larger than the padded grid": ("inception_b", lambda x, b, bias, f: (
        torch.randn(2, 24, 3, 3), [b[0], torch.randn(12, 4 * 3 * 24, 32), *b[2:]], bias, _edit(f, i25=4))),
    "stage out of range": ("googlenet", lambda x, b, bias, f: (x, b, bias, _edit(f, i59=10**12))),
    "negative stage": ("googlenet", lambda x, b, bias, f: (x, b, bias, _edit(f, i59=-1))),
    "consumer before its producer": ("googlenet", lambda x, b, bias, f: (x, b, bias, _edit(f, i9=1, i31=0, i45=0))),
    "output channel never written": ("googlenet", lambda x, b, bias, f: (x, b, bias, _edit(f, i5=32))),
    "segment moved from the output to a buffer": ("googlenet", lambda x, b, bias, f: (x, b, bias, _edit(f, i20=0))),
    "segment count overflows": ("googlenet", lambda x, b, bias, f: (x, b, bias, _edit(f, i67=2**62 + 1))),
    "buffer count overflows": ("googlenet", lambda x, b, bias, f: (x, b, bias, _edit(f, i0=2**62))),
    "x without channels": ("googlenet", lambda x, b, bias, f: (
        torch.randn(2, 0, 5, 5), [torch.randn(1, 0, 32), *b[1:3], torch.randn(1, 0, 32)], bias, f)),
    "a weight on the meta device": ("googlenet", lambda x, b, bias, f: (x, [b[0].to("meta"), *b[1:]], bias, f)),
    # The plan's last value is x's channel count: weights packed for another x must not run
    # (a 3x3 over x packed for Winograd for 9 channels has the rows of a direct one for 25).
    "x with other channels than the plan's": ("googlenet", lambda x, b, bias, f: (
        torch.randn(2, x.shape[1] + 1, 5, 5), b, bias, f)),
    "in_channels missing from the plan": ("googlenet", lambda x, b, bias, f: (x, b, bias, f[:-1])),
}


@needs_cpu_kernel
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_malformed_calls_of_the_cpu_operator_raise(case):
    block, make = BAD_CALLS[case]
    args = make(*_graph_op_case(block))
    with pytest.raises((RuntimeError, ValueError)):
        torch.ops.inception_fast.graph_forward(*args)


@needs_cpu_kernel
def test_out_overlapping_x_is_refused():
    spec = ifast.InceptionSpec(13, 4, 5, 4, 3, 3, 2)  # 13 channels in and out
    fused = ifast.FusedInception.from_module(reference_module(spec)).eval()
    x = torch.randn(2, 13, 5, 5).contiguous(memory_format=torch.channels_last)
    b, bias = fused._packed("cpu")
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        torch.ops.inception_fast.graph_forward.out(x, list(b), list(bias), list(fused._flat_plan), out=x)


@needs_cpu_kernel
@pytest.mark.parametrize("block", ["googlenet", "inception_b"])
def test_the_unedited_calls_run(block):
    """The cases above start from valid calls: without the edit, each gives the module's output."""
    x, b, bias, flat = _graph_op_case(block)
    y = torch.ops.inception_fast.graph_forward(x, b, bias, flat)
    assert torch.isfinite(y).all() and y.shape[1] == flat[1 + 2 * flat[0]]


@needs_cpu_kernel
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_inputs_too_small_for_an_unpadded_kernel_raise_on_the_kernel_and_the_shape_function(device):
    """One pixel short of a 5x5 'valid' convolution: the C++ kernel and the fake (meta)
    implementation that torch.compile traces with both raise, as eager's convolution does,
    instead of an empty output."""
    from inception_fast.ops.branch_graph import pack_weights
    from inception_fast.ops.plan import plan
    from inception_fast.spec import Branch, BranchGraphSpec, Conv

    graph = plan(BranchGraphSpec(3, (Branch(((Conv(3, 4, 5, 5, padded=False),),)),), None, None))
    b, bias = pack_weights(graph, [torch.randn(4, 3, 5, 5)], [torch.zeros(4)], "cpu")
    x = torch.randn(1, 3, 4, 4, device=device)
    with pytest.raises(RuntimeError, match="smaller than the block's unpadded|at least 5x5"):
        torch.ops.inception_fast.graph_forward(x, [t.to(device) for t in b], [t.to(device) for t in bias],
                                               graph.flat())
