"""The FID workflow (inception_fast/fid.py, `fid-bench`): pytorch-fid's InceptionV3 built
offline, our Fréchet distance against pytorch-fid's, and the benchmark on 2 images."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_fid")
pytest.importorskip("timm")
pytest.importorskip("scipy")

# The reference calculate_frechet_distance passes `disp=` to scipy's sqrtm, deprecated in SciPy 1.17.
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")

import pytorch_fid.inception as pfi  # noqa: E402
from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: E402

from inception_fast import fid  # noqa: E402
from inception_fast.cli import main  # noqa: E402

from conftest import needs_cpu_kernel  # noqa: E402


def _no_network(*args, **kwargs):
    raise AssertionError("network access while building the model")


@pytest.fixture(scope="module")
def fid_model():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        mp.setattr(torch.hub, "load_state_dict_from_url", _no_network)
        loader = pfi.load_state_dict_from_url
        model = fid.fid_inception_v3()
        assert pfi.load_state_dict_from_url is loader  # put back after construction
    return model


def _blocks(model):
    return [m for m in model.modules() if fid._BLOCK_CLASS.match(type(m).__name__)]


def test_offline_model_is_pytorch_fids_architecture_with_random_bn_stats(fid_model):
    assert isinstance(fid_model, pfi.InceptionV3) and not fid_model.training
    blocks = _blocks(fid_model)
    assert len(blocks) == 11
    assert [type(b).__name__ for b in blocks].count("FIDInceptionE_2") == 1
    bn = fid_model.blocks[2][0].branch_pool.bn
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    with torch.no_grad():
        (features,) = fid_model(torch.rand(1, 3, 299, 299))
    assert features.shape == (1, 2048, 1, 1)
    assert torch.isfinite(features).all() and features.abs().mean() > 1e-3  # not vanished by 0/1 statistics
    # Seeded: the same random model every time, and the caller's random stream is not moved.
    state = torch.get_rng_state()
    again = fid.fid_inception_v3()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(fid_model.state_dict().values(), again.state_dict().values()))


def test_weights_file_is_loaded_strictly(fid_model, tmp_path):
    state = {k: v.clone() for k, v in _inception_state(fid_model).items()}
    state["Mixed_5b.branch1x1.conv.weight"].fill_(0.25)
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    loaded = fid.fid_inception_v3(str(path))
    assert torch.equal(loaded.blocks[2][0].branch1x1.conv.weight, state["Mixed_5b.branch1x1.conv.weight"])
    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="fc.bias"):
        fid.fid_inception_v3(str(path))


def _inception_state(model):
    """The state dict a pytorch-fid weights file holds: torchvision's inception_v3 names."""
    names = {"blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
             "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3"}
    names |= {f"blocks.2.{i}": n for i, n in enumerate(
        ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"])}
    names |= {f"blocks.3.{i}": n for i, n in enumerate(["Mixed_7a", "Mixed_7b", "Mixed_7c"])}
    state = {}
    for key, value in model.state_dict().items():
        prefix = ".".join(key.split(".")[:3])
        state[names[prefix] + key[len(prefix):]] = value
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return state


def test_frechet_distance_is_pytorch_fids():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((40, 16)), rng.standard_normal((40, 16)) * 1.3 + 0.2
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid.frechet_distance(*stats) == pytest.approx(calculate_frechet_distance(*stats), rel=1e-12)
    assert fid.frechet_distance(stats[0], stats[1], *stats[:2]) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("n, d", [(5, 64), (30, 300), (100, 8)], ids=["n<d", "n<d-wide", "n>d"])
def test_fid_from_features_matches_pytorch_fid(n, d):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((n, d)) + 0.3, rng.standard_normal((n + 1, d)) * 1.1
    want = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    got, method = fid.fid_from_features(a.astype(np.float32), b.astype(np.float32))
    assert method == ("pytorch-fid calculate_frechet_distance" if n > d else "low-rank exact (SVD)")
    # Low rank: scipy's sqrtm of a singular product is itself off by ~1e-7 relative.
    assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        fid.fid_from_features(a[:1], b)


@needs_cpu_kernel
def test_fid_bench_two_images_swapped_fid_agrees():
    lines = []
    report = fid.fid_bench(2, batch=2, rounds=1, contenders=("eager", "swapped"), progress=lines.append,
                           models=("pytorch-fid",))
    (table,) = report.tables
    assert table.blocks == 11 and len(table.fused) >= 1 and len(table.fused) + len(table.unfused) == 11
    # convs=True by default: the stem's five conv units (1a, 2a, 2b, 3b, 4a) too, each checked.
    assert table.conv_units == [f"blocks.{i}" for i in ("0.0", "0.1", "0.2", "1.0", "1.1")]
    rows = {r.contender: r for r in table.rows}
    assert set(rows) == {"eager", "swapped"}
    for r in rows.values():
        assert all(math.isfinite(v) for v in (r.seconds, r.features_per_s, r.max_rel_err, r.fid, r.fid_rel_diff))
        assert r.fid > 0 and len(r.round_seconds) == 1
    assert rows["eager"].max_rel_err == 0 and rows["swapped"].max_rel_err < 1e-4
    assert rows["swapped"].fid_rel_diff <= fid.FID_RTOL and report.ok
    assert sum("round 1/1" in line for line in lines) == 2  # one progress line per contender and round
    markdown = report.to_markdown()
    assert f"{len(table.fused)} of 11" in markdown and "5 conv units of the stem" in markdown and "PASS" in markdown
    assert f"allocator: {report.machine['allocator']}." in markdown  # it moves CPU features/s by ~1.2x
    json.dumps(report.to_json_dict())


def test_fid_bench_checks_its_arguments():
    with pytest.raises(ValueError, match="eager"):
        fid.fid_bench(2, contenders=("swapped",))
    with pytest.raises(ValueError, match="n_images"):
        fid.fid_bench(1)
    with pytest.raises(ValueError, match="device must be"):
        fid.fid_bench(2, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            fid.fid_bench(2, device="cuda")


def test_timm_model_has_eleven_blocks_and_random_bn_stats():
    model = fid.timm_inception_v3()
    assert len(_blocks(model)) == 11 and not model.training
    bn = model.Mixed_5b.branch1x1.bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("args, words", [
    (["--images", "1"], "--images"),
    (["--weights", "no/such/file.pth"], "no such file"),
    (["--write-readme"], "markers"),
    (["--device", "tpu"], "--device"),
    pytest.param(["--device", "cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_cli_bad_arguments_exit_2_before_running(args, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a README.md without fid markers
    (tmp_path / "README.md").write_text("# nothing here\n")
    assert main(["fid-bench", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


@needs_cpu_kernel
def test_cli_fid_bench_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("before\n<!-- fid:start -->\nold\n<!-- fid:end -->\nafter\n")
    code = main(["fid-bench", "--images", "2", "--batch", "2", "--rounds", "1", "--no-compile", "--out", "out",
                 "--write-readme"])
    out = capsys.readouterr()
    assert code == 0
    assert "pytorch-fid InceptionV3" in out.out and "timm inception_v3" in out.out
    assert "round 1/1 swapped" in out.err
    data = json.loads((tmp_path / "out" / "fid.json").read_text())
    assert data["ok"] and [t["model"] for t in data["tables"]] == ["pytorch-fid InceptionV3", "timm inception_v3"]
    assert [r["contender"] for r in data["tables"][0]["rows"]] == ["eager", "swapped"]
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("before\n<!-- fid:start -->\n") and readme.endswith("<!-- fid:end -->\nafter\n")
    assert "old" not in readme and (tmp_path / "out" / "fid.md").read_text().strip() in readme
