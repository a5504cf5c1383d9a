import subprocess
import sys

import pytest

from inception_fast.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "inception_fast", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("demo", "profile", "verify", "bench"):
        assert command in out.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["profile", "googlenet_paper", "--input", "1,3,x"], "--input"),
        (["profile", "googlenet_paper", "--input", "1,3,224"], "--input"),
        (["profile", "no.such.module:factory"], "does not import"),
        (["verify", "notamodel"], "MODEL must be one of"),
        (["bench", "--dtype", "float16", "--device", "cpu", "--blocks", "3a", "--batch", "1"], "AVX512-FP16"),
        (["bench", "--convs", "--blocks", "3a", "--batch", "1"], "--convs applies to --whole-networks only"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, words, capsys):
    # In process (the entry point itself: test_help_lists_the_subcommands): python -m
    # inception_fast exits with main()'s return value, or argparse's SystemExit.
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and words in err
    assert "Traceback" not in err


def test_profile_exits_1_over_budget(capsys, tmp_path):
    assert main(["profile", "googlenet_paper", "--budget", "1e9", "--plot", str(tmp_path / "p.png"), "--meta"]) == 1
    assert "OVER" in capsys.readouterr().out
    assert main(["profile", "googlenet_paper", "--budget", "2e9", "--format", "csv"]) == 0


def test_verify_passes_on_torchvision_googlenet(capsys):
    assert main(["verify", "googlenet", "--input", "1,3,224,224"]) == 0
    assert "9 fused block(s); PASS" in capsys.readouterr().out


def test_verify_exits_1_past_tolerance(capsys):
    assert main(["verify", "googlenet", "--input", "1,3,64,64", "--rtol", "1e-15"]) == 1
    assert "FAIL at rtol 1e-15" in capsys.readouterr().out


def test_verify_checks_inception_v3_blocks(capsys):
    assert main(["verify", "inception_v3", "--input", "1,3,107,107"]) == 0
    assert "11 fused block(s); PASS" in capsys.readouterr().out


def test_verify_that_checked_no_block_fails(capsys):
    assert main(["verify", "alexnet", "--input", "1,3,64,64"]) == 1
    assert "0 fused block(s); FAIL" in capsys.readouterr().out


def test_write_readme_replaces_only_the_marker_lines(tmp_path):
    """A marker quoted inside a sentence is prose: only the lines between the marker lines
    are replaced (a sentence quoting them once had a table spliced into it)."""
    from inception_fast.cli import UsageError, _write_readme_section

    readme = tmp_path / "README.md"
    prose = "`--write-readme` replaces the text between the `<!-- fid:start -->` and `<!-- fid:end -->` markers.\n"
    readme.write_text(prose + "before\n<!-- fid:start -->\nold table\n<!-- fid:end -->\nafter\n")
    _write_readme_section(readme, "fid", "new table\n")
    assert readme.read_text() == prose + "before\n<!-- fid:start -->\nnew table\n<!-- fid:end -->\nafter\n"
    readme.write_text(prose)
    with pytest.raises(UsageError, match="exactly one"):
        _write_readme_section(readme, "fid", "x")

