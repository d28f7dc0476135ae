"""``npas-fx``: make, inspect and draw parameter-sharing plans from the command line.

::

    npas-fx plan examples.models:small_cnn --budget 0.1 --input-shape 1,3,32,32 --out plan.json --draw plan.svg
    npas-fx show plan.json
    npas-fx draw plan.json -o plan.svg
    npas-fx plan mymodels:net --budget 10% --strategy swn --data mymodels:batches --loss cross_entropy

A saved plan is re-applied in Python, without searching again::

    gm = npas_fx.compile(model, plan=npas_fx.Plan.from_json("plan.json"))

Exit status: 0 on success, 2 for a user error (bad argument, module path, budget or plan file;
one line on stderr, no traceback), 1 for an unexpected failure (``--traceback`` shows it).

Example:
    >>> parse_budget("0.1"), parse_budget("5000"), parse_budget("10%"), parse_shape("1,3,32,32")
    (0.1, 5000, 0.1, (1, 3, 32, 32))
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "parse_budget", "parse_shape", "load_model", "load_data", "load_loss", "UsageError"]

EXAMPLES = """\
examples:
  npas-fx plan examples.models:small_cnn --budget 0.1 --input-shape 1,3,32,32 --out plan.json --draw plan.svg
  npas-fx show plan.json
  npas-fx draw plan.json -o plan.png

re-apply a saved plan in Python:
  gm = npas_fx.compile(model, plan=npas_fx.Plan.from_json("plan.json"))
"""


class UsageError(Exception):
    """A mistake in what the user asked for; reported in one line with exit status 2."""


# ---- argument types ------------------------------------------------------------------------------
def parse_budget(text: str) -> int | float:
    """``"5000"`` -> 5000 parameters; ``"0.1"`` or ``"10%"`` -> 0.1 (a multiple of the model's count)."""
    from .budget import parse_budget_text  # the same reading as npas_fx.compile(model, "10%")

    try:
        number = parse_budget_text(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("`budget` ")) from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"the budget should be positive and finite, got {text!r}")
    return number


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` (or ``"1x3x32x32"``) -> ``(1, 3, 32, 32)``."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape: give positive integers separated by commas, e.g. 1,3,32,32"
        )
    return shape


def _picture_path(text: str) -> Path:
    from .draw import FORMATS

    path = Path(text)
    if path.suffix.lower().lstrip(".") not in FORMATS:
        raise argparse.ArgumentTypeError(
            f"cannot tell the picture format of {text!r}: end it with one of {', '.join('.' + f for f in FORMATS)}"
        )
    return path


# ---- loading a model -----------------------------------------------------------------------------
def _import(module_name: str) -> Any:
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"no Python file {module_name!r} (from {os.getcwd()}).")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None  # a .py file always has a source loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `npas-fx plan mymodels:net` finds ./mymodels.py
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UsageError(
            f"cannot import {module_name!r} ({error}); run npas-fx from the directory that contains it "
            "or add that directory to PYTHONPATH."
        ) from error


def _resolve(spec: str) -> Any:
    """The object named by ``MODULE:ATTRIBUTE`` (not called)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"expected MODULE:CALLABLE such as examples.models:small_cnn, got {spec!r}.")
    try:
        module = _import(module_name)
    except UsageError:
        raise
    except Exception as error:  # the user's module failed while importing
        raise UsageError(f"importing {module_name!r} failed: {type(error).__name__}: {error}") from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
            )
            raise UsageError(
                f"{module_name!r} has no {attribute!r}; it defines: {', '.join(names) or 'nothing callable'}."
            )
        target = getattr(target, part)
    return target


def load_model(spec: str) -> Any:
    """The ``nn.Module`` named by ``MODULE:CALLABLE`` (the callable is called with no arguments).

    ``MODULE`` is a dotted module path importable from the current directory or a ``.py`` file;
    ``CALLABLE`` a function or class returning a module, or a module instance.

    Example:
        >>> type(load_model("torch.nn:Identity")).__name__
        'Identity'
    """
    from torch import nn

    target = _resolve(spec)
    if isinstance(target, nn.Module):
        return target
    if not callable(target):
        raise UsageError(f"{spec!r} is a {type(target).__name__}, not a callable that returns an nn.Module.")
    try:
        model = target()
    except Exception as error:  # the user's factory failed
        raise UsageError(f"calling {spec}() failed: {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}; it should return a torch.nn.Module.")
    return model


def load_data(spec: str) -> Any:
    """The batches of ``--data MODULE:CALLABLE``: the callable is called with no arguments and
    returns an iterable of batches (see :mod:`npas_fx.search.pretrain` for the batch convention)."""
    target = _resolve(spec)
    try:
        data = target() if callable(target) else target
    except Exception as error:  # the user's data function failed
        raise UsageError(f"calling {spec}() failed: {type(error).__name__}: {error}") from error
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise UsageError(f"--data {spec} gave a {type(data).__name__}; it should return an iterable of batches.")
    return data


def load_loss(spec: str) -> Any:
    """``--loss``: ``MODULE:CALLABLE`` (a loss function) or a name in ``torch.nn.functional``.

    Example:
        >>> load_loss("cross_entropy").__name__
        'cross_entropy'
    """
    import torch.nn.functional as F

    if ":" not in spec:
        loss = getattr(F, spec, None)
        if not callable(loss):
            raise UsageError(
                f"--loss {spec!r} is no function of torch.nn.functional; give e.g. cross_entropy or MODULE:CALLABLE."
            )
        return loss
    loss = _resolve(spec)
    if not callable(loss):
        raise UsageError(f"--loss {spec} is a {type(loss).__name__}, not a callable loss_fn(output, target).")
    return loss


# ---- commands ------------------------------------------------------------------------------------
def _check_writable(paths: Sequence[Path]) -> None:
    for path in paths:
        if not path.parent.is_dir():
            raise UsageError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist.")


def _draw_options(args: argparse.Namespace) -> dict[str, Any]:
    collapse = {"auto": None, "yes": True, "no": False}[args.collapse]
    return {"collapse": collapse, "max_layers": args.max_layers, "similarity_threshold": args.similarity_threshold}


def _search_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``data``/``loss_fn``/``search_steps`` for a learned strategy (which cannot run without data)."""
    from .validation import LEARNED

    search = {"data": args.data, "loss": args.loss, "search_steps": args.search_steps}
    given = [f"--{k.replace('_', '-')}" for k, v in search.items() if v is not None]
    if args.strategy not in LEARNED:
        if given:
            raise UsageError(f"{', '.join(given)} only serve the learned strategies (ssn, swn), not {args.strategy!r}.")
        return {}
    if args.data is None:
        raise UsageError(
            f"--strategy {args.strategy} learns from data: pass --data MODULE:CALLABLE (returns an iterable of "
            "(inputs, target) batches) and --loss (a torch.nn.functional name such as cross_entropy, or MODULE:CALLABLE)."
        )
    out: dict[str, Any] = {"data": load_data(args.data), "search_steps": args.search_steps}
    if args.loss is not None:
        out["loss_fn"] = load_loss(args.loss)
    return out


def _run_plan(args: argparse.Namespace) -> int:
    import torch

    import npas_fx

    outputs = ([args.out] if args.out else []) + list(args.draw)
    _check_writable(outputs)
    torch.manual_seed(args.seed)  # the model's random init (and so the plan's gains) is reproducible
    model = load_model(args.model)
    inputs = tuple(torch.randn(shape) for shape in args.input_shape)
    generators = npas_fx.GeneratorConfig(
        downsample=args.downsample, upsample=args.upsample, max_templates=args.max_templates
    )
    gm = npas_fx.compile(
        model,
        args.budget,
        example_inputs=inputs or None,
        strategy=args.strategy,
        seed=args.seed,
        generators=generators,
        keep=args.keep,
        num_groups=args.num_groups,
        **_search_arguments(args),
    )
    plan = npas_fx.plan_of(gm)
    print(plan.summary())
    if inputs:
        shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
        try:
            with torch.no_grad():
                got, want = gm(*inputs), model(*inputs)
        except Exception as error:
            raise UsageError(
                f"the model does not run on --input-shape {shapes}: {type(error).__name__}: {error}"
            ) from error
        got_shape, want_shape = getattr(got, "shape", None), getattr(want, "shape", None)
        if got_shape != want_shape:
            raise RuntimeError(
                f"npas_fx bug: the compiled model returned shape {got_shape}, the original {want_shape}."
            )
        print(f"checked: the compiled model runs on {shapes} and returns {'x'.join(map(str, got_shape or ()))}")
    if args.out:
        plan.to_json(str(args.out))
        print(f"wrote {args.out}  (re-apply: npas_fx.compile(model, plan=npas_fx.Plan.from_json({str(args.out)!r})))")
    for path in args.draw:
        npas_fx.draw_plan(plan, path, **_draw_options(args))
        print(f"wrote {path}")
    return 0


def _read_plan(path: str) -> Any:
    import json

    from .plan import Plan

    if not Path(path).is_file():
        raise UsageError(f"no plan file {path!r}; make one with `npas-fx plan ... --out {path}`.")
    try:
        return Plan.from_json(path)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as error:
        raise UsageError(f"{path!r} is not an npas_fx plan ({type(error).__name__}: {error}).") from error


def _run_show(args: argparse.Namespace) -> int:
    plan = _read_plan(args.plan)
    print(plan.summary())
    if plan.provenance:
        print("provenance: " + ", ".join(sorted(map(str, plan.provenance))))
    return 0


def _run_draw(args: argparse.Namespace) -> int:
    from .draw import draw_plan

    _check_writable(args.output)
    plan = _read_plan(args.plan)
    for path in args.output:
        draw_plan(plan, path, **_draw_options(args))
        print(f"wrote {path}")
    return 0


# ---- the parser ----------------------------------------------------------------------------------
def _strategy_help() -> str:
    from .strategies import STRATEGIES

    width = max(map(len, STRATEGIES), default=0)
    lines = []
    for name in sorted(STRATEGIES):
        doc = (inspect.getdoc(STRATEGIES[name]) or "").replace("``", "")
        lines.append(f"  {name:<{width}}  {doc.splitlines()[0] if doc else ''}")
    return "strategies:\n" + "\n".join(lines)


def _add_draw_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("picture")
    group.add_argument(
        "--collapse",
        choices=("auto", "yes", "no"),
        default="auto",
        help="draw runs of identical blocks (h.0.*, h.1.*, ...) once; auto: when there are more than --max-layers layers",
    )
    group.add_argument("--max-layers", type=int, default=48, metavar="N", help="threshold of --collapse auto (48)")
    group.add_argument(
        "--similarity-threshold",
        type=float,
        default=0.5,
        metavar="S",
        help="join layers whose similarity score (from learned strategies) is at least S (0.5)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``npas-fx`` argument parser."""
    from .budget import DOWNSAMPLERS, UPSAMPLERS, GeneratorConfig
    from .strategies import STRATEGIES

    formatter = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    parser = argparse.ArgumentParser(
        prog="npas-fx",
        description="Compile a PyTorch model to an exact trainable-parameter budget, save and draw its sharing plan.",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plan = commands.add_parser(
        "plan",
        parents=[common],
        help="compile a model given by its module path; print, save and draw its plan",
        description="Compile MODULE:CALLABLE to --budget trainable parameters; print the plan, save it (--out) "
        "and draw it (--draw).",
        epilog=_strategy_help()
        + "\n\nexample:\n  npas-fx plan examples.models:small_cnn --budget 0.1 --strategy shape "
        "--input-shape 1,3,32,32 --out plan.json --draw plan.svg",
        formatter_class=formatter,
    )
    plan.add_argument(
        "model",
        metavar="MODULE:CALLABLE",
        help="a function or class returning an nn.Module, called with no arguments: a dotted module path "
        "importable from the current directory (examples.models:small_cnn) or a file (path/to/models.py:net)",
    )
    plan.add_argument(
        "-b",
        "--budget",
        type=parse_budget,
        required=True,
        help="trainable parameters: a count (5000), a multiple of the model's (0.1, 2.0) or a percentage (10%%)",
    )
    plan.add_argument(
        "-s",
        "--strategy",
        choices=sorted(STRATEGIES),
        default="auto",
        metavar="NAME",
        help="who shares (auto: single below the model's size, shape at or above it; see below)",
    )
    plan.add_argument("--seed", type=int, default=0, help="seeds the model's init, the grouping and the banks (0)")
    plan.add_argument(
        "--input-shape",
        type=parse_shape,
        action="append",
        default=[],
        metavar="SHAPE",
        help="shape of a random example input, e.g. 1,3,32,32 (repeat for several inputs): given to the "
        "strategy and used to check that the compiled model runs",
    )
    plan.add_argument("--num-groups", type=int, metavar="K", help="number of groups (random and learned strategies)")
    plan.add_argument("--keep", metavar="REGEX", help="keep the parameters whose name fully matches REGEX dense")
    plan.add_argument(
        "--data",
        metavar="MODULE:CALLABLE",
        help="ssn/swn: a function returning an iterable of (inputs, target) batches for the search",
    )
    plan.add_argument(
        "--loss",
        metavar="NAME|MODULE:CALLABLE",
        help="ssn/swn: loss_fn(output, target): a torch.nn.functional name (cross_entropy) or MODULE:CALLABLE",
    )
    plan.add_argument("--search-steps", type=int, metavar="N", help="ssn/swn: pre-training steps of the search")
    defaults = GeneratorConfig()
    plan.add_argument("--downsample", choices=DOWNSAMPLERS, default=defaults.downsample, help="generator of big banks")
    plan.add_argument("--upsample", choices=UPSAMPLERS, default=defaults.upsample, help="generator of small banks")
    plan.add_argument("--max-templates", type=int, default=defaults.max_templates, metavar="K", help="cap on K")
    plan.add_argument("-o", "--out", type=Path, metavar="PLAN.json", help="save the plan as JSON")
    plan.add_argument(
        "--draw",
        type=_picture_path,
        action="append",
        default=[],
        metavar="PICTURE",
        help="draw the plan to .svg, .png, .pdf or .dot (repeatable)",
    )
    _add_draw_options(plan)
    plan.set_defaults(run=_run_plan)

    show = commands.add_parser(
        "show",
        parents=[common],
        help="print a saved plan as a table",
        description="Print a saved plan: one row per generated layer, the groups and the budget accounting.",
        epilog="example:\n  npas-fx show plan.json",
        formatter_class=formatter,
    )
    show.add_argument("plan", metavar="PLAN.json", help="a plan saved by `npas-fx plan --out` or Plan.to_json")
    show.set_defaults(run=_run_show)

    draw = commands.add_parser(
        "draw",
        parents=[common],
        help="draw a saved plan with graphviz",
        description="Draw a saved plan: one lane per group with its bank, layers in execution order, each "
        "layer's generator on the edge from its bank, and a legend with the budget accounting.",
        epilog="example:\n  npas-fx draw plan.json -o plan.svg -o plan.png",
        formatter_class=formatter,
    )
    draw.add_argument("plan", metavar="PLAN.json", help="a plan saved by `npas-fx plan --out` or Plan.to_json")
    draw.add_argument(
        "-o",
        "--output",
        type=_picture_path,
        action="append",
        required=True,
        metavar="PICTURE",
        help=".svg, .png, .pdf or .dot (repeatable)",
    )
    _add_draw_options(draw)
    draw.set_defaults(run=_run_draw)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``npas-fx`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 and a usage message on bad arguments
    try:
        return int(args.run(args))
    except (UsageError, ValueError, TypeError, KeyError, OSError) as error:
        if args.traceback:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"npas-fx {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as error:
        if args.traceback:
            raise
        print(f"npas-fx {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        print("run again with --traceback for the details", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
