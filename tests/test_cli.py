"""The command line: JSON outputs, exit codes and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from analysis.cli import main
from tests.conftest import ROOT


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_flops_json_matches_papers(capsys):
    code, out, _ = run_cli(
        capsys,
        "flops",
        "--model",
        "deit_small_patch16_224",
        "--weights",
        "random",
        "--schedule",
        "tome:r=13",
        "--json",
    )
    report = json.loads(out)
    assert code == 0
    assert round(report["gmacs"], 1) == 2.7 and round(report["gmacs_full"], 1) == 4.6
    assert report["tokens"][:3] == [184, 171, 158] and len(report["tokens"]) == 12


def test_flops_at_another_size(capsys):
    code, out, _ = run_cli(
        capsys,
        "flops",
        "--model",
        "test_vit",
        "--weights",
        "random",
        "--img-size",
        "320",
        "--schedule",
        "evit:keep=0.5@1",
        "--json",
    )
    report = json.loads(out)
    assert code == 0 and report["img_size"] == 320
    assert report["tokens"][0] == 401 and report["tokens"][1] == 1 + 200 + 1  # CLS, kept, fused


def test_bad_schedule_is_one_clear_line(capsys):
    code, out, err = run_cli(
        capsys, "flops", "--model", "test_vit", "--weights", "random", "--schedule", "tome:r=2@40"
    )
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "beyond the depth" in err and "Traceback" not in err


def test_run_reports_top5_for_a_classifier(capsys, tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (180, 120), (200, 30, 40)).save(path)
    code, out, _ = run_cli(
        capsys,
        "run",
        "--model",
        "test_vit",
        "--weights",
        "random",
        "--image",
        str(path),
        "--schedule",
        "tome:r=8",
        "--json",
    )
    report = json.loads(out)
    assert code == 0
    assert len(report["top5"]) == 5 and len(report["top5_full"]) == 5
    assert report["tokens"][0] == 101 - 8
    assert 0.0 < report["gmacs"] < report["gmacs_full"]


def test_run_on_the_default_backbone_reports_fidelity(capsys, tmp_path, default_model):
    path = tmp_path / "img.jpg"
    Image.new("RGB", (300, 200), (20, 120, 220)).save(path)
    code, out, _ = run_cli(capsys, "run", "--image", str(path), "--schedule", "tome:r=8", "--json")
    report = json.loads(out)
    assert code == 0 and "top5" not in report
    assert report["tokens"][0] == 257 - 8
    assert 0.5 < report["fidelity_cosine"] <= 1.0 + 1e-6


def test_corrupt_image_is_a_clear_error(capsys, tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\xff\xd8 definitely not a jpeg")
    code, _, err = run_cli(
        capsys, "run", "--model", "test_vit", "--weights", "random", "--image", str(path)
    )
    assert code == 2 and "could not read bad.jpg" in err and "Save it as PNG or JPEG" in err


def test_verify_passes_and_reports(capsys):
    code, out, _ = run_cli(capsys, "verify", "--model", "test_vit", "--weights", "random", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["max_abs_diff"]["logits"] <= 1e-5


def test_verify_fails_loudly_on_an_unsupported_model(capsys):
    code, _, err = run_cli(
        capsys, "verify", "--model", "eva02_tiny_patch14_224", "--weights", "random"
    )
    assert code == 2 and "eva02_tiny_patch14_224" in err


@pytest.mark.parametrize("command", ["flops", "run", "verify", "bench"])
def test_every_command_has_help(command):
    completed = subprocess.run(
        [sys.executable, "-m", "analysis", command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0 and "usage:" in completed.stdout


def test_bench_prints_side_by_side_ratios(capsys):
    code, out, _ = run_cli(
        capsys,
        "bench",
        "--model",
        "test_vit",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--r",
        "4",
        "--json",
    )
    report = json.loads(out)
    names = [row["name"] for row in report["rows"]]
    assert code == 0 and names == ["timm forward", "engine none", "engine tome r=4"]
    tome = report["rows"][2]
    assert tome["flop_ratio"] > 1.0
    assert tome["realized"] == pytest.approx(tome["speedup"] / tome["flop_ratio"])


def test_help_and_parser_start_without_torch():
    """`python -m analysis --help` and every subcommand's parser need no torch (seconds
    of import on a busy CPU); only the commands that run something import it."""
    import subprocess
    import sys

    code = (
        "import sys, analysis.cli, analysis.sweep_cli;"
        "analysis.cli.build_parser(); analysis.sweep_cli.build_parser();"
        "import analysis; analysis.TokenScopeError;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
