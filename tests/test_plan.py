"""The typed plan (ops/plan.py): its wire format round-trips, and csrc/plan.h holds the
same codes and record sizes as the Python side."""

import re
from pathlib import Path

import pytest

import inception_fast as ifast
from inception_fast.ops import plan as P

from conftest import small_v3_block

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "plan.h"


def _header_values() -> dict[str, int]:
    """Every `kName = value` of csrc/plan.h (enumerators and constexprs alike)."""
    return {name: int(value) for name, value in re.findall(r"\b(k[A-Z]\w*)\s*=\s*(-?\d+)", HEADER.read_text())}


def test_the_cpp_header_mirrors_the_python_codes():
    want = {f"kSource{''.join(w.title() for w in s.name.split('_'))}": int(s) for s in P.Source}
    want |= {f"kDest{''.join(w.title() for w in d.name.split('_'))}": int(d) for d in P.Destination}
    want |= {"kGemmHead": P.GEMM_HEAD, "kSegmentFields": P.SEGMENT_FIELDS, "kConvRecord": P.CONV_RECORD}
    assert _header_values() == want


def test_record_sizes_match_the_typed_steps():
    assert P.GEMM_HEAD == len(P.GemmStep._fields) - 1  # every field but `convs`, which stays in Python
    assert P.SEGMENT_FIELDS == len(P.Segment._fields)
    assert P.CONV_RECORD == len(P.ConvStep._fields)


def _specs():
    yield "googlenet", ifast.GOOGLENET_INCEPTION["3a"].spec.to_graph()
    from inception_fast.fused_graph import FusedBranchGraph

    for name in "ABCDE":
        yield f"v3-{name}", FusedBranchGraph(small_v3_block(name)).spec


@pytest.mark.parametrize("name, spec", list(_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_the_wire_format_round_trips(name, spec):
    graph = P.plan(spec)
    back = P.GraphPlan.from_flat(graph.flat())
    assert back.flat() == graph.flat()
    assert (back.buf_channels, back.buf_border, back.out_channels, back.stride, back.pool_copy_channel) == (
        graph.buf_channels, graph.buf_border, graph.out_channels, graph.stride, graph.pool_copy_channel)
    # from_flat numbers convolutions in GEMM column order: the same set, permuted.
    assert sorted(back.convs) == sorted(graph.convs)
    assert P.GraphPlan.from_backward_flat(graph.backward_flat())[4] == list(graph.convs)


def test_googlenet_preset_plan():
    s = ifast.GOOGLENET_INCEPTION["4a"].spec
    graph = P.plan(s.to_graph())
    # stage 0: [1x1 | 3x3 reduce | 5x5 reduce] over x and the projection over max-pooled x;
    # stage 1: K3 over buffer 0 (t3), K5 over buffer 1 (t5).
    assert [(g.stage, g.source, g.cols) for g in graph.gemms] == [
        (0, P.Source.X, s.ch1x1 + s.ch3x3red + s.ch5x5red), (1, 0, s.ch3x3), (1, 1, s.ch5x5),
        (0, P.Source.MAX_POOL, s.pool_proj)]
    assert graph.buf_channels == (s.ch3x3red, s.ch5x5red) and graph.buf_border == (s.k3 // 2, s.k5 // 2)
    assert graph.reductions() == {0: 1, 1: 3}  # t3 from w3r, t5 from w5r: recomputable from x


def _residual_plan():
    from conftest import small_residual_block
    from inception_fast.fused_graph import FusedBranchGraph

    return P.plan_with_residual(FusedBranchGraph.from_module(small_residual_block()).graph)


@pytest.mark.parametrize("name, spec", list(_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_real_plans_validate(name, spec):
    assert P.plan(spec).validate() is not None


def _edited(graph: P.GraphPlan, gemm: int, **change) -> P.GraphPlan:
    """graph with fields of GEMM `gemm` (or of its first segment, under seg_*) replaced."""
    g = graph.gemms[gemm]
    seg = {k[4:]: v for k, v in change.items() if k.startswith("seg_")}
    g = g._replace(**{k: v for k, v in change.items() if not k.startswith("seg_")})
    if seg:
        g = g._replace(segments=(g.segments[0]._replace(**seg), *g.segments[1:]))
    return graph.__class__(**{**graph.__dict__, "gemms": graph.gemms[:gemm] + (g,) + graph.gemms[gemm + 1:]})


# What GraphPlan.validate (the Triton host's check, the C++ parser's rules) refuses: plans of
# a flat list of any origin, each of which would have read or written outside its tensors
# or returned memory nothing wrote (found by an adversarial review of the Triton host).
@pytest.mark.parametrize("edit, words", [
    (lambda g: _edited(g, 2, stage=1), "reads buffer 1 before stage 1 has written it"),  # the tail beside its concat
    (lambda g: g.__class__(**{**g.__dict__, "buf_channels": (g.buf_channels[0], 6)}), "writes past the 6 channels"),
    (lambda g: g.__class__(**{**g.__dict__, "buf_channels": (g.buf_channels[0], 12)}), "channel 9 of buffer 1 is "
     "written 0 times"),
    (lambda g: _edited(g, 0, seg_begin=1), "bad segment"),
    (lambda g: _edited(g, 1, stride=2), "must write the output"),
    (lambda g: _edited(g, 0, source=7), "out of range"),
], ids=["read-before-write", "short-buffer", "unwritten-channel", "gap-in-columns", "stride-2-into-buffer",
        "bad-source"])
def test_validate_refuses_a_corrupted_plan(edit, words):
    graph = _residual_plan().validate()
    with pytest.raises(ValueError, match=words):
        edit(graph).validate()
