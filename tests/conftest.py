"""Shared test helpers: the tolerance table, error metric, random modules and inputs."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import inception_fast as ifast
from inception_fast._extension import cpu_extension

# ||y - ref|| / ||ref|| against an fp64 reference. In reduced precision the fused error
# must also stay within 2x eager PyTorch's own error in that dtype on the same input.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}

# Channel counts that are not multiples of any block size, odd grids, K5 = 3 and 5.
AWKWARD_SPECS = [
    pytest.param(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6), id="tiny-odd"),
    pytest.param(ifast.InceptionSpec(20, 17, 33, 35, 4, 19, 21, k5=3), id="k5=3"),
    pytest.param(ifast.InceptionSpec(37, 40, 24, 33, 8, 47, 1, k3=5, k5=7), id="k3=5,k5=7"),
]
AWKWARD_SIZES = [pytest.param((1, 1, 1), id="n1-1x1"), pytest.param((3, 7, 7), id="n3-7x7"),
                 pytest.param((1, 13, 13), id="n1-13x13"), pytest.param((2, 5, 9), id="n2-5x9")]

def tiered(*axes, slow) -> list:
    """The product of axes of pytest.param values as one parameter list, each combination
    marked `slow` where slow(*ids) is true: `make test` (-m "not slow") keeps every path on
    its cheapest shapes, `make test-all` runs the whole matrix."""
    params = []
    for combo in itertools.product(*axes):
        ids = [p.id for p in combo]
        marks = [pytest.mark.slow] if slow(*ids) else []
        params.append(pytest.param(*(p.values[0] for p in combo), id="-".join(ids), marks=marks))
    return params


def dtype_params(*dtypes) -> list:
    return [pytest.param(d, id=str(d).replace("torch.", "")) for d in dtypes]


needs_cpu_kernel = pytest.mark.skipif(cpu_extension() is None, reason="C++ extension not built")


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A different, reproducible random stream per test: fresh inputs, never a shared tensor."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    if torch.isnan(got).any():
        return float("nan")  # a NaN never passes: nan <= tol is False
    denom = want.norm().item()
    return (got - want).norm().item() / (denom if denom > 0 else 1.0)


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights, biases and BN statistics, so that no term is zero by construction."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return module


def small_v3_block(name: str, in_channels: int = 24) -> torch.nn.Module:
    """torchvision's Inception{name} (A to E) with few input channels, randomized, in eval mode."""
    from torchvision.models import inception as tv

    make = {"A": lambda: tv.InceptionA(in_channels, pool_features=8), "B": lambda: tv.InceptionB(in_channels),
            "C": lambda: tv.InceptionC(in_channels, channels_7x7=12), "D": lambda: tv.InceptionD(in_channels),
            "E": lambda: tv.InceptionE(in_channels)}[name]
    return randomize_(make()).eval()


def reference_module(spec, batch_norm=False) -> ifast.ReferenceInception:
    return randomize_(ifast.ReferenceInception(spec, batch_norm=batch_norm)).eval()


def weights_of(module, dtype=None):
    """The twelve conv tensors of a block, in InceptionWeights order (optionally cast)."""
    from inception_fast.ops.inception import InceptionWeights

    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    return InceptionWeights(*(t if dtype is None else t.detach().to(dtype) for c in convs for t in (c.weight, c.bias)))


def run_poisoned(x, weights, backend):
    """Run into a NaN-filled `out`, so that an element the kernel skips shows up as NaN."""
    n, _, h, w = x.shape
    out = torch.full((n, weights.spec().out_channels, h, w), float("nan"), dtype=x.dtype)
    out = out.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = ifast.inception(x, *weights, backend=backend, out=out)
    assert y.data_ptr() == out.data_ptr()
    return y


def assert_special_values_propagate(backend):
    """NaN and +-inf in x reach the same output positions as in the reference module."""
    ref = reference_module(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6))
    x = torch.randn(2, 13, 6, 6)
    x[0, 2, 1, 1] = float("nan")
    x[1, 4, 4, 4] = float("inf")
    x[0, 7, 0, 5] = float("-inf")
    want = ref(x)
    with torch.no_grad():
        got = ifast.FusedInception.from_module(ref, backend=backend)(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isposinf(got), torch.isposinf(want))
    finite = torch.isfinite(want)
    assert rel_err(got[finite], want[finite]) <= TOLERANCE[torch.float32]


class _SmallResidual(torch.nn.Module):
    """Inception-ResNet's block form (timm's Block35) at a few channels: two conv+BN+ReLU
    branches, no pool, concat, 1x1 with bias, scaled, x added back, ReLU (or none)."""

    def __init__(self, channels: int = 8, scale: float = 0.3, relu: bool = True):
        super().__init__()
        unit = lambda cin, cout, k: torch.nn.Sequential(  # noqa: E731
            torch.nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU())
        self.branch0 = unit(channels, 4, 1)
        self.branch1 = torch.nn.Sequential(unit(channels, 3, 1), unit(3, 5, 3))
        self.conv2d = torch.nn.Conv2d(9, channels, 1)
        self.scale, self.relu = scale, torch.nn.ReLU() if relu else None

    def forward(self, x):
        out = self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1)) * self.scale + x
        return self.relu(out) if self.relu is not None else out


def small_residual_block(relu: bool = True, channels: int = 8) -> torch.nn.Module:
    return randomize_(_SmallResidual(channels, relu=relu)).eval()


def assert_block_matches(fused, block, x: torch.Tensor, parameters: bool = True, tol: float | None = None) -> None:
    """fused(x) against block(x), then with one grad_output the gradient of x and (with
    `parameters`) of every parameter, in order; tolerance of x's dtype by default."""
    tol = TOLERANCE[x.dtype] if tol is None else tol
    x, x_ref = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y, want = fused(x), block(x_ref)
    assert rel_err(y, want) <= tol
    grad = torch.randn_like(want)
    y.backward(grad)
    want.backward(grad)
    assert rel_err(x.grad, x_ref.grad) <= tol
    if parameters:
        for (name, p), q in zip(fused.named_parameters(), block.parameters()):
            assert rel_err(p.grad, q.grad) <= tol, name


@pytest.fixture
def data_grad_spy(monkeypatch):
    """Winograd data gradients on every grid (branch_graph's thresholds off) and the list of
    the data-gradient plans made: a spy, so that a test can assert the path ran."""
    from inception_fast.ops import branch_graph

    for name in ("DATA_GRAD_MIN_MACS", "DATA_GRAD_MIN_PIXELS", "WALK_MIN_MACS"):
        monkeypatch.setattr(branch_graph, name, 0)
    planned = []
    plan_of = branch_graph._data_grad_plan
    monkeypatch.setattr(branch_graph, "_data_grad_plan", lambda *shape: planned.append(shape) or plan_of(*shape))
    return planned


@pytest.fixture(params=[4, 2], ids=["wgrad-F4x4", "wgrad-F2x2"])
def weight_grad_spy(request, monkeypatch):
    """Winograd weight gradients on every grid, as F(4x4, 3x3) or F(2x2, 3x3) (branch_graph's
    thresholds set so), and the list of the tiles they ran with: a spy, so that a test can
    assert the path ran."""
    from inception_fast.ops import branch_graph

    monkeypatch.setattr(branch_graph, "WEIGHT_GRAD_MIN_CHANNELS", 0)
    monkeypatch.setattr(branch_graph, "WEIGHT_GRAD_MIN_TILES", 0)
    monkeypatch.setattr(branch_graph, "WEIGHT_GRAD_F4_MIN_TILES", 0 if request.param == 4 else 2 ** 62)
    used = []
    pick = branch_graph.weight_grad_tile
    monkeypatch.setattr(branch_graph, "weight_grad_tile", lambda *shape: used.append(tile := pick(*shape)) or tile)
    return used
