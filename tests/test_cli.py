"""The ``npas-fx`` command line: end to end in a subprocess, errors and argument parsing in process."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import npas_fx
from npas_fx.cli import main, parse_budget, parse_shape
from npas_fx.plan import Plan

REPO = Path(__file__).resolve().parents[1]


def npas_fx_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "npas_fx.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def load_small_cnn() -> torch.nn.Module:
    sys.path.insert(0, str(REPO))
    try:
        from examples.models import small_cnn
    finally:
        sys.path.remove(str(REPO))
    return small_cnn()


def test_plan_show_draw_end_to_end_and_the_saved_plan_re_applies(tmp_path, capsys):
    plan_file, svg, png = tmp_path / "plan.json", tmp_path / "plan.svg", tmp_path / "plan.png"
    run = npas_fx_cli(
        "plan", "examples.models:small_cnn", "--budget", "0.1", "--strategy", "shape",
        "--input-shape", "1,3,32,32", "--out", str(plan_file), "--draw", str(svg),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    plan = Plan.from_json(str(plan_file))
    assert plan.summary() in run.stdout and "returns 1x10" in run.stdout
    assert plan_file.read_text() == plan.to_json() + "\n"  # the file round-trips exactly
    assert all(x.name in svg.read_text() for x in plan.layers)

    assert main(["show", str(plan_file)]) == 0
    assert capsys.readouterr().out.startswith(plan.summary())
    assert main(["draw", str(plan_file), "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"

    # "done when": the saved plan re-applies to the model built the same way
    model = load_small_cnn()
    gm = npas_fx.compile(model, plan=Plan.from_json(str(plan_file)))
    assert npas_fx.count_parameters(gm) == plan.budget == round(0.1 * npas_fx.count_parameters(model))
    assert npas_fx.plan_of(gm) == plan
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_console_script_loads_models_from_the_current_directory_and_from_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent(
            """
            import torch
            def net():
                return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))
            """
        )
    )
    script = Path(sys.executable).with_name("npas-fx")  # installed by `pip install -e .` (make)
    assert script.exists(), "install npas_fx (pip install -e .) so that the npas-fx script exists"
    run = subprocess.run([str(script), "plan", "mymodels:net", "--budget", "40", "--out", "p.json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert Plan.from_json(str(tmp_path / "p.json")).budget == 40

    monkeypatch.chdir(tmp_path.parent)
    assert main(["plan", f"{tmp_path.name}/mymodels.py:net", "--budget", "40", "--seed", "3"]) == 0
    assert "achieved 40" in capsys.readouterr().out
    assert main(["plan", f"{tmp_path.name}/mymodels.py:net", "--budget", "3"]) == 2
    assert "smallest feasible budget" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "no_such_module_xyz:net", "-b", "0.1"], "cannot import 'no_such_module_xyz'"),
        (["plan", "examples.models:nope", "-b", "0.1"], "it defines: block_stack, small_cnn"),
        (["plan", "examples.models", "-b", "0.1"], "expected MODULE:CALLABLE"),
        (["plan", "torch.nn:Linear", "-b", "0.1"], "calling torch.nn:Linear() failed"),
        (["plan", "examples.models:small_cnn", "-b", "3"], "smallest feasible budget"),
        (["plan", "examples.models:small_cnn", "-b", "0.1", "--input-shape", "1,5,32,32"], "example_inputs"),
        (["plan", "examples.models:small_cnn", "-b", "0.1", "--out", "no/such/dir/p.json"], "does not exist"),
        (["show", "missing.json"], "no plan file 'missing.json'"),
        (["show", "pyproject.toml"], "is not an npas_fx plan"),
        (["draw", "missing.json", "-o", "x.svg"], "no plan file"),
    ],
)
def test_user_errors_exit_2_with_a_message_and_no_traceback(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "examples.models:small_cnn", "-b", "lots"], "is not a budget"),
        (["plan", "examples.models:small_cnn", "-b", "-5"], "should be positive"),
        (["plan", "examples.models:small_cnn", "-b", "0.1", "--input-shape", "1,3,x"], "is not a shape"),
        (["plan", "examples.models:small_cnn", "-b", "0.1", "-s", "nope"], "invalid choice: 'nope'"),
        (["plan", "examples.models:small_cnn", "-b", "0.1", "--draw", "p.jpg"], "end it with one of .svg"),
        (["plan", "examples.models:small_cnn"], "--budget"),
        (["draw", "plan.json"], "-o/--output"),
        ([], "COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: npas-fx" in err


def test_help_names_the_commands_and_shows_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and all(c in out for c in ("plan", "show", "draw", "Plan.from_json"))
    for command in ("plan", "show", "draw"):
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        assert f"npas-fx {command} " in out.split("example:")[1]
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in npas_fx.STRATEGIES)  # each strategy listed with its description


def test_the_same_seed_gives_the_same_plan_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    for name in ("a.json", "b.json"):
        argv = [
            "plan",
            "examples.models:small_cnn",
            "-b",
            "0.3",
            "-s",
            "random",
            "--seed",
            "7",
            "-o",
            str(tmp_path / name),
        ]
        assert main(argv) == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert Plan.from_json(str(tmp_path / "a.json")).seed == 7


@pytest.mark.parametrize(
    ("text", "value"), [("5000", 5000), ("5_000", 5000), ("0.1", 0.1), ("2.0", 2.0), ("10%", 0.1), ("1e-1", 0.1)]
)
def test_parse_budget(text, value):
    result = parse_budget(text)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize("text", ["", "abc", "0", "-1", "0.0", "inf", "nan", "%"])
def test_parse_budget_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_budget(text)


@pytest.mark.parametrize("text", ["", "1,,3", "1,3,0", "-1", "a,b", "1.5"])
def test_parse_shape_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_shape(text)


def test_parse_shape_accepts_commas_and_x():
    assert parse_shape("1,3,32,32") == parse_shape("1x3x32x32") == (1, 3, 32, 32)
