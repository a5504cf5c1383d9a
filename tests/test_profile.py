import copy

import pytest
import torch
import torchvision.models as tvm
from conftest import needs_cpu_kernel, reference_module, small_v3_block
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import inception_fast as ifast
from inception_fast.cli import main
from inception_fast.fused_graph import FusedBranchGraph
from inception_fast._aten_flops import ATEN_FORMULAS
from inception_fast.models import googlenet_paper
from inception_fast.profile import _meta_twin, format_count


def test_inception_rows_equal_the_spec_counts():
    report = ifast.profile(googlenet_paper().eval(), (1, 3, 224, 224), meta=True)
    rows = {r.name: r for r in report.rows}
    for name, block in ifast.GOOGLENET_INCEPTION.items():
        assert rows[f"inception{name}"].macs == block.spec.macs(block.size, block.size).total
        assert rows[f"inception{name}"].params == block.spec.params().total


def test_googlenet_paper_is_near_the_papers_budget():
    # Table 1 of the paper sums to about 1.58 G multiply-adds (the text rounds to "1.5 billion").
    # We measure 1.583 G: allow 6% over the 1.5 G budget, and no more.
    report = ifast.profile(googlenet_paper().eval(), (1, 3, 224, 224), budget=1.5e9, meta=True)
    assert 1.5e9 * 0.95 <= report.total_macs <= 1.5e9 * 1.06
    assert report.total_params == sum(p.numel() for p in googlenet_paper().parameters())
    assert report.unattributed_macs == 0


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_fused_model_counts_the_same_as_the_original(backend):
    original = googlenet_paper(aux_logits=False).eval()
    swapped = ifast.swap_inception(googlenet_paper(aux_logits=False).eval(), backend=backend)
    assert ifast.profile(swapped, (1, 3, 112, 112)).total_macs == ifast.profile(original, (1, 3, 112, 112)).total_macs


def test_macs_scale_with_batch_and_resolution():
    model = googlenet_paper(aux_logits=False).eval()
    one = ifast.profile(model, (1, 3, 224, 224), meta=True).rows
    four = ifast.profile(model, (4, 3, 224, 224), meta=True).rows
    assert all(b.macs == 4 * a.macs for a, b in zip(one, four))
    big = {r.name: r.macs for r in ifast.profile(model, (1, 3, 448, 448), meta=True).rows}
    assert big["inception3a"] == 4 * {r.name: r.macs for r in one}["inception3a"]


def test_renders_and_plots(tmp_path):
    report = ifast.profile(googlenet_paper().eval(), (1, 3, 224, 224), budget=1.5e9, meta=True)
    assert "| inception3a |" in report.to_markdown()
    assert '"total_macs"' in report.to_json()
    assert report.to_csv().splitlines()[0] == "name,type,detail,output_shape,params,macs,auxiliary"
    path = report.plot(tmp_path / "profile.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs, words",
    [(dict(input_size=(1, 3, 0, 224)), "input_size"), (dict(input_size="1,3,224,224"), "input_size"),
     (dict(budget=-1), "budget")],
)
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ifast.profile(torch.nn.Linear(2, 2), **kwargs)


def test_inception_rows_break_down_into_the_six_convolutions():
    report = ifast.profile(googlenet_paper().eval(), (2, 3, 224, 224), meta=True)
    for row in report.rows:
        if row.name.startswith("inception"):
            assert list(row.breakdown) == ["#1×1", "#3×3 reduce", "#3×3", "#5×5 reduce", "#5×5", "pool proj"]
            assert sum(row.breakdown.values()) == row.macs
    assert "↳ #5×5 reduce" in report.to_markdown()


def test_auxiliary_heads_are_counted_apart_from_the_inference_total():
    model = googlenet_paper().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = ifast.profile(model, (1, 3, 224, 224), meta=True)
    aux = [r for r in report.rows if r.auxiliary]
    assert [r.name for r in aux] == ["aux1", "aux2"] and all(r.macs > 0 for r in aux)
    assert report.aux_macs == sum(r.macs for r in aux)
    inference = ifast.profile(googlenet_paper(aux_logits=False).eval(), (1, 3, 224, 224), meta=True).total_macs
    assert report.total_macs == inference
    with_aux = ifast.profile(model, (1, 3, 224, 224), include_aux=True, meta=True)
    assert with_aux.total_macs == inference + report.aux_macs
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_depth_two_goes_one_level_deeper():
    model = googlenet_paper(aux_logits=False).eval()
    shallow = ifast.profile(model, (1, 3, 224, 224), meta=True)
    deep = ifast.profile(model, (1, 3, 224, 224), depth=2, meta=True)
    names = [r.name for r in deep.rows]
    assert "conv1.0" in names and "conv1.1" in names  # Conv2d and ReLU of conv1
    assert "inception3a" in names  # blocks stay whole, broken down by branch
    assert deep.total_macs == shallow.total_macs == sum(r.macs for r in deep.rows)


# -- torchvision's own counts -----------------------------------------------------------------


@pytest.mark.parametrize("name, weights, size", [
    ("vit_b_16", "ViT_B_16_Weights", 224),  # attention: 17.564 G (the MHA fast path hid 6.3 G of it)
    ("googlenet", "GoogLeNet_Weights", 224),
    ("inception_v3", "Inception_V3_Weights", 299),
    ("resnet50", "ResNet50_Weights", 224),
])
def test_totals_equal_torchvision_metadata(name, weights, size):
    # torchvision's meta["_ops"] is in G multiply-adds (its "GFLOPS" are MACs), to 3 decimals.
    with torch.device("meta"):  # built on meta: no weights initialised
        model = getattr(tvm, name)(weights=None)
    report = ifast.profile(model, (1, 3, size, size), meta=True)
    assert round(report.total_macs / 1e9, 3) == getattr(tvm, weights).IMAGENET1K_V1.meta["_ops"]


# -- attention, LSTM, functional ops ------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d=64, heads=4):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(d, heads, dim_feedforward=128, batch_first=True)

    def forward(self, x):
        x, _ = self.mha(x, x, x)  # a tuple output
        return self.encoder(x)


def attention_macs(n, length, d, ff=None):
    projections = n * length * d * 3 * d + n * length * d * d
    scores = 2 * n * length * length * d  # QK^T and AV over all heads
    return projections + scores + (2 * n * length * d * ff if ff else 0)


@pytest.mark.parametrize("meta", [False, True])
def test_attention_counts_every_product(meta):
    model = Attention().eval()
    report = ifast.profile(model, (2, 10, 64), meta=meta)
    rows = {r.name: r for r in report.rows}
    assert rows["mha"].macs == attention_macs(2, 10, 64)
    assert rows["encoder"].macs == attention_macs(2, 10, 64, ff=128)
    assert rows["mha"].output_shape == (2, 10, 64)  # first tensor of the (output, weights) tuple
    assert torch.backends.mha.get_fastpath_enabled()  # turned back on


def test_cpu_attention_formula_forward_and_backward():
    class SDPA(nn.Module):
        def forward(self, q):
            return nn.functional.scaled_dot_product_attention(q, q, q)

    q = torch.randn(2, 4, 10, 16, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=ATEN_FORMULAS) as c:
        SDPA()(q).sum().backward()
    forward = 2 * 2 * 4 * 10 * 10 * 16  # QK^T and AV
    assert c.get_total_flops() // 2 == forward + 5 * forward // 2  # backward: 5 products of that size
    assert ifast.profile(SDPA(), (2, 4, 10, 16)).total_macs == forward


@pytest.mark.parametrize("meta", [False, True])
def test_lstm_counts_its_gates(meta):
    # 32 steps x 4 gates x 128 x (64 inputs + 128 hidden), batch 1: 3,145,728.
    assert ifast.profile(nn.LSTM(64, 128), (32, 1, 64), meta=meta).total_macs == 3_145_728
    two = nn.LSTM(64, 128, num_layers=2, bidirectional=True, batch_first=True)
    want = 3 * 32 * 2 * 4 * 128 * ((64 + 128) + (256 + 128))  # batch 3, both directions, 2 layers
    report = ifast.profile(two, (3, 32, 64), meta=meta)
    assert report.total_macs == want and [r.name for r in report.rows] == ["LSTM"]  # the model is one row


def test_lstm_backward_is_twice_its_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(16, 32)

        def forward(self, x):
            return self.lstm(x)

    report = ifast.profile(Net(), (8, 2, 16), backward=True)
    row = report.rows[0]
    assert row.macs == 8 * 2 * 4 * 32 * (16 + 32) and row.backward_macs == 2 * row.macs
    assert row.output_shape == (8, 2, 32)  # not "not run": the output is a tuple


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.w = nn.Parameter(torch.randn(16, 5))

    def forward(self, x):
        return self.conv(x).flatten(1) @ self.w  # (1, 16) @ (16, 5): 80 MACs outside any row


def test_functional_ops_have_their_own_row():
    report = ifast.profile(Functional(), (1, 3, 2, 2))
    assert [r.name for r in report.rows] == ["conv", "(functional)"]
    assert report.rows[1].macs == report.unattributed_macs == 80
    assert sum(r.macs for r in report.rows) == report.total_macs == 48 + 80
    shares = [r for r in report.to_markdown().splitlines() if r.startswith("| conv") or r.startswith("| (func")]
    assert "37.5%" in shares[0] and "62.5%" in shares[1]


def test_table_units_and_kernel_column():
    report = ifast.profile(tvm.googlenet(weights=None, aux_logits=False, init_weights=False), (1, 3, 224, 224),
                           meta=True)
    table = report.to_markdown()
    assert "0.0 M" not in table and "| maxpool1 | MaxPool2d | 3×3 / 2 | 64×56×56 | 0 | 0 |" in table
    assert "**1.50 G**" in table
    assert "| conv1 | BasicConv2d | 7×7 / 2 |" in table  # read off BasicConv2d's .conv
    assert [format_count(n) for n in (443, 705_000, 54_400_000, 1_583_000_000)] == ["443", "705 k", "54.4 M", "1.58 G"]


# -- auxiliary heads, train mode, leaving the model alone ---------------------------------------


class TwoHeads(nn.Module):
    """aux_proj is on the inference path despite its name; side runs in train mode only."""

    def __init__(self):
        super().__init__()
        self.aux_proj = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)
        self.side = nn.Linear(8, 10)

    def forward(self, x):
        features = self.aux_proj(x).mean((2, 3))
        out = self.fc(features)
        return (out, self.side(features)) if self.training else out


def test_auxiliary_heads_are_found_by_the_inference_path_not_the_name():
    report = ifast.profile(TwoHeads(), (1, 3, 32, 32))  # in train mode, as built
    rows = {r.name: r for r in report.rows}
    assert not rows["aux_proj"].auxiliary and rows["aux_proj"].macs == 30 * 30 * 8 * 27
    assert rows["side"].auxiliary and report.aux_macs == 80
    assert report.total_macs == 30 * 30 * 8 * 27 + 80
    assert ifast.profile(TwoHeads(), (1, 3, 32, 32), include_aux=True).total_macs == report.total_macs + 80


def test_torchvision_inception_v3_with_its_aux_head_at_batch_1(capsys):
    with torch.device("meta"):
        model = tvm.inception_v3(weights=None, init_weights=False)  # aux_logits=True, train mode
    report = ifast.profile(model, (1, 3, 299, 299), meta=True)
    assert round(report.total_macs / 1e9, 3) == 5.713
    assert [r.name for r in report.rows if r.auxiliary] == ["AuxLogits"] and report.aux_macs > 0
    assert main(["profile", "torchvision.models:inception_v3", "--input", "1,3,299,299", "--meta"]) == 0
    assert "AuxLogits (auxiliary, MACs not in total)" in capsys.readouterr().out


def test_an_input_size_the_aux_heads_cannot_take(capsys):
    report = ifast.profile(googlenet_paper(), (1, 3, 160, 160), meta=True)
    assert report.total_macs == ifast.profile(googlenet_paper(aux_logits=False), (1, 3, 160, 160),
                                              meta=True).total_macs
    assert any("aux1: not counted" in note for note in report.notes)
    assert main(["profile", "googlenet_paper", "--input", "1,3,160,160", "--meta"]) == 0
    assert "aux1: not counted" in capsys.readouterr().out


def test_an_input_size_the_model_cannot_take_is_one_line_and_exit_2(capsys):
    with pytest.raises(ifast.ModelDoesNotRun, match="does not run on 1×3×16×16"):
        ifast.profile(googlenet_paper(), (1, 3, 16, 16), meta=True)
    assert main(["profile", "googlenet_paper", "--input", "1,3,16,16", "--meta"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not run on" in err


def hooks_of(model):
    return [(name, tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks))
            for name, m in model.named_modules()]


@pytest.mark.parametrize("backward", [False, True])
def test_profiling_leaves_the_model_bit_identical(backward):
    model = tvm.googlenet(weights=None, aux_logits=True, init_weights=False)  # train mode, as built
    model.inception3a.register_forward_hook(lambda *a: None)
    model.aux1.eval()
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    hooks, rng = hooks_of(model), torch.get_rng_state()
    report = ifast.profile(model, (2, 3, 48, 48), backward=backward)
    assert report.aux_macs > 0 and (report.backward_macs or 0) >= (report.total_macs if backward else 0)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(state[k], after[k]) for k in state)
    assert [m.training for m in model.modules()] == modes and hooks_of(model) == hooks
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


# -- the fused ops' formulas, forward and backward -------------------------------------------------


def flops_of(module, x, backward=True):
    with FlopCounterMode(display=False) as counter:
        y = module(x)
        if backward:
            y.sum().backward()
    return counter.get_total_flops()


@needs_cpu_kernel
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_fused_backward_counts_as_the_reference(x_grad, batch_norm):
    ref = reference_module(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6), batch_norm=batch_norm)
    fused = ifast.FusedInception.from_module(copy.deepcopy(ref), backend="cpu").eval()
    x = torch.randn(2, 13, 9, 9, requires_grad=x_grad)
    step, forward = flops_of(ref, x), flops_of(ref, x, backward=False)
    assert flops_of(fused, x) == step
    # Backward: every weight gradient, and every data gradient but x's unless x needs one.
    assert step == 3 * forward if x_grad else forward * 2 < step < 3 * forward


@needs_cpu_kernel
@pytest.mark.parametrize("name", ["A", "B", "E"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_graph_backward_counts_as_the_original(name, x_grad):
    block = small_v3_block(name)
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").eval()
    x = torch.randn(2, 24, 9, 9, requires_grad=x_grad)
    assert flops_of(fused, x) == flops_of(block, x)


def test_every_graph_forward_formula_counts_once():
    # Registered once for the four ops: counting any of them used to raise
    # "_graph_flops() got multiple values for keyword argument 'out_shape'".
    from torch.utils.flop_counter import flop_registry

    from inception_fast.ops.branch_graph import pack_weights

    fused = FusedBranchGraph.from_module(small_v3_block("C"))
    weights = [torch.randn(c.out_channels, c.in_channels, c.kh, c.kw) for c in fused.spec.convs]
    b, bias = pack_weights(fused._plan, weights, [torch.zeros(w.shape[0]) for w in weights], "cpu")
    x = torch.empty(2, 24, 9, 9, device="meta")
    y = torch.empty(2, fused.spec.out_channels, 9, 9, device="meta")
    ops = torch.ops.inception_fast
    for op in (ops.graph_forward, ops.graph_triton_forward, ops.graph_forward_saving, ops.graph_triton_forward_saving):
        assert flop_registry[op](x, b, bias, fused._flat_plan, out_val=y) == 2 * fused.spec.macs(9, 9, 2)


def test_swapped_inception_v3_with_grad_on_counts_as_the_original():
    with torch.device("meta"):
        original = tvm.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    swapped = ifast.swap_inception(copy.deepcopy(original)).eval()
    x = torch.empty(1, 3, 299, 299, device="meta")
    assert flops_of(swapped, x) == flops_of(original, x)
    assert ifast.profile(swapped, (1, 3, 299, 299), meta=True).total_macs == \
        ifast.profile(original, (1, 3, 299, 299), meta=True).total_macs


def test_triton_backend_block_profiles(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets backend="triton" take a CPU (here meta) tensor
    block = small_v3_block("A")
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="triton").eval()
    want = ifast.profile(block, (2, 24, 9, 9), meta=True).total_macs
    assert ifast.profile(fused, (2, 24, 9, 9), meta=True).total_macs == want
    x = torch.empty(2, 24, 9, 9, device="meta", requires_grad=True)
    twin = _meta_twin(fused)
    assert flops_of(twin, x) == flops_of(_meta_twin(block), x)


# -- inputs, nested view, backward ---------------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, x, y, scale=1.0):
        return self.a(x) * scale + self.b(y)


def test_inputs_tuple_dict_kwargs_and_meta():
    x, y = torch.randn(2, 4), torch.randn(2, 6)
    want = 2 * 4 * 3 + 2 * 6 * 3
    assert ifast.profile(TwoInputs(), inputs=(x, y)).total_macs == want
    assert ifast.profile(TwoInputs(), inputs={"x": x, "y": y}, kwargs={"scale": 2.0}).total_macs == want
    assert ifast.profile(TwoInputs(), inputs=(x,), kwargs={"y": y}, meta=True).total_macs == want
    report = ifast.profile(TwoInputs(), inputs=[x, y])
    assert report.input_size == (2, 4) and report.inputs == "2×4 float32, 2×6 float32"
    with pytest.raises(ValueError, match="not both"):
        ifast.profile(TwoInputs(), (2, 4), inputs=(x, y))
    with pytest.raises(TypeError, match="inputs must be"):
        ifast.profile(TwoInputs(), inputs=7)


def test_integer_token_ids():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))
    report = ifast.profile(model, (2, 7), dtype=torch.long)  # ids must stay below 50 to run at all
    assert report.total_macs == 2 * 7 * 16 * 50
    assert ifast.profile(model, inputs=torch.randint(0, 50, (2, 7)), meta=True).total_macs == report.total_macs
    assert main(["profile", "torch.nn:Identity", "--input", "2,7", "--dtype", "int64"]) == 0


def test_nested_view_shows_parents_with_subtotals():
    with torch.device("meta"):
        model = tvm.googlenet(weights=None, aux_logits=False, init_weights=False)
    flat = ifast.profile(model, (1, 3, 224, 224), meta=True)
    report = ifast.profile(model, (1, 3, 224, 224), depth=2, nested=True, meta=True)
    rows = {r.name: r for r in report.rows}
    assert rows["inception3a"].subtotal and rows["inception3a"].depth == 1
    assert rows["inception3a.branch2"].depth == 2 and not rows["inception3a.branch2"].subtotal
    assert rows["inception3a"].macs == sum(r.macs for n, r in rows.items() if n.startswith("inception3a."))
    assert sum(r.macs for r in report.leaf_rows()) == report.total_macs == flat.total_macs
    assert "| inception3a | Inception (subtotal) |" in report.to_markdown()
    assert report.to_csv().splitlines()[0].endswith("auxiliary,depth,subtotal")


def test_backward_counts_one_training_step():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    report = ifast.profile(model, (1, 3, 8, 8), backward=True)
    conv, linear = 6 * 6 * 8 * 27, 288 * 10
    assert report.total_macs == conv + linear
    # The first conv needs no input gradient: its weight gradient only; the linear layer both.
    assert [r.backward_macs for r in report.rows] == [conv, 0, 0, 2 * linear]
    assert report.backward_macs == conv + 2 * linear and report.training_step_macs == 2 * conv + 3 * linear
    assert "| backward MACs | fwd + bwd |" in report.to_markdown()


def test_backward_of_auxiliary_heads_is_apart():
    with torch.device("meta"):
        model = tvm.googlenet(weights=None, aux_logits=True, init_weights=False)
    report = ifast.profile(model, (2, 3, 224, 224), meta=True, backward=True)
    rows = {r.name: r for r in report.rows}
    assert rows["aux1"].auxiliary and rows["aux1"].backward_macs > 0
    main_rows = [r for r in report.leaf_rows()]
    assert sum(r.backward_macs for r in main_rows) == report.backward_macs
    with_aux = ifast.profile(model, (2, 3, 224, 224), meta=True, backward=True, include_aux=True)
    assert with_aux.backward_macs == report.backward_macs + rows["aux1"].backward_macs + rows["aux2"].backward_macs
