"""Command line: ``lipdeq {demo, train, eval, bench, certify, models, data}`` (thin wrappers).

Exit codes: 0 success; 2 a fault in what the user gave (a :class:`~lipdeq.errors.LipdeqError`,
printed as one line naming the problem, or a bad command-line argument); 1 the operating system
refused a file or network operation (an ``OSError``: missing file, disk full, read-only directory),
printed as one line naming the path; 130 interrupted. Any other exception is a bug or a resource
failure (an out-of-memory ``RuntimeError``): it propagates with its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lipdeq.checks import check_int, check_real
from lipdeq.errors import LipdeqError
from lipdeq.jsonsafe import json_safe

EXIT_USER_ERROR = 2
EXIT_OS_ERROR = 1


def _checked(convert: type, check: Callable[[object], object]) -> Callable[[str], object]:
    """An argparse ``type``: ``convert`` the text (``int``/``float``), then validate it with a
    :mod:`lipdeq.checks` rule; argparse turns the refusal into a usage error naming the option."""

    def parse(text: str) -> object:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if convert is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            return check(value)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


_POSITIVE_INT = _checked(int, lambda v: check_int("value", v, minimum=1))
_POSITIVE_SECONDS = _checked(float, lambda v: check_real("value", v, above=0.0))


def _device(text: str) -> str:
    """argparse ``type`` for ``--device``: refuse, as a usage error, what
    :func:`lipdeq.training.device.resolve_device` refuses (every command, the benchmarks included)."""
    from lipdeq.training.device import DeviceError, resolve_device  # imports torch: only with --device

    try:
        resolve_device(text, distributed=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    except DeviceError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _with_data_dir(overrides: list[str], data_dir: str | None) -> list[str]:
    return [*overrides, f"data.data_dir={json.dumps(data_dir)}"] if data_dir else list(overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from lipdeq.configs import load_config
    from lipdeq.training import train

    cfg = load_config(args.config, _with_data_dir(args.set, args.data_dir))
    result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device,
                   progress=not args.no_progress)
    summary = {"out": str(result.out_dir), "step": result.step, "epoch": result.epoch,
               "stopped_by": result.stopped_by, "skipped_steps": result.skipped_steps, **result.final_eval}
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(json_safe(summary)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lipdeq.training import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, overrides=_with_data_dir(args.set, args.data_dir),
                                  device=args.device)
    if not args.json:
        for k, v in metrics.items():
            print(f"{k:>28}: {v}")
    print(json.dumps(json_safe(metrics)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lipdeq.demo import run_demo

    run_demo(out_dir=Path(args.out), data_dir=args.data_dir, seconds_per_model=args.seconds, steps=args.steps)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "solvers":
        from lipdeq.benchmarks import solvers

        # --device was ignored here (the solvers always ran on the CPU); its default stays the CPU
        figures = solvers.run(batch_size=args.batch_size, repeats=args.repeats, device=args.device or "cpu")
        print(solvers.format_report(figures))
    elif args.what == "memory":
        from lipdeq.benchmarks import memory

        print(memory.format_report(memory.run(device=args.device)))
    else:
        from lipdeq.benchmarks import paper

        paper.run(out_dir=Path(args.out), profile="full" if args.full else "quick", data_dir=args.data_dir,
                  device=args.device)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from lipdeq.models import create_model

    model = create_model(args.model)  # an unknown name is a ConfigError: one line naming the presets
    for mode in ("hyper", "weights"):
        cert = model.lipschitz_bound(mode=mode)
        print(f"{args.model} [{mode}] Lip(f) <= {cert.value:.4f}" + (f"  ({cert.reason})" if cert.reason else ""))
        if args.parts:
            for k, v in cert.parts.items():
                print(f"    {k:>22}: {v:.4f}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lipdeq.models import create_model, list_models

    print(f"{'model':<16} {'params':>12} {'in f':>12} {'Lip(f) at caps':>16}")
    for name in list_models():
        m = create_model(name)
        bound = m.lipschitz_bound(mode="hyper").value
        print(f"{name:<16} {m.num_parameters():>12,} {m.num_parameters('f'):>12,} {bound:>16.4f}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from lipdeq.data import download_cifar10

    path = download_cifar10(args.dest)
    print(f"CIFAR-10 ready in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lipdeq`` command."""
    p = argparse.ArgumentParser(prog="lipdeq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train lipmdeq_tiny and mdeq_tiny briefly and compare them")
    demo.add_argument("--data-dir", help="CIFAR-10 directory (default: the embedded synthetic set)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.add_argument("--seconds", type=_POSITIVE_SECONDS, default=60.0,
                      help="training budget per model (default 60)")
    demo.add_argument("--steps", type=_POSITIVE_INT, default=None, help="fixed number of steps per model instead")
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train a preset or YAML config")
    tr.add_argument("--config", required=True, help="preset name (see `lipdeq models`) or YAML file")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--data-dir", help="CIFAR-10 directory (or set LIPDEQ_DATA_DIR)")
    reuse = tr.add_mutually_exclusive_group()
    reuse.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    reuse.add_argument("--overwrite", action="store_true", help="reuse a directory that holds another run")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    tr.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda when available)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or meta.json")
    ev.add_argument("--data-dir")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--device", type=_device, default=None)
    ev.add_argument("--json", action="store_true", help="print only one JSON object")
    ev.set_defaults(func=cmd_eval)

    be = sub.add_parser("bench", help="benchmarks: the paper's claim (default), solvers, memory")
    be.add_argument("what", nargs="?", default="paper", choices=["paper", "solvers", "memory"])
    prof = be.add_mutually_exclusive_group()
    prof.add_argument("--quick", action="store_true", help="CPU-sized profile (default)")
    prof.add_argument("--full", action="store_true", help="the GPU recipe: full training of both models")
    be.add_argument("--data-dir", help="CIFAR-10 directory (default: $LIPDEQ_DATA_DIR; with neither, the "
                    "paper bench uses the embedded synthetic set and says so)")
    be.add_argument("--out", default="runs/bench")
    be.add_argument("--device", type=_device, default=None)
    be.add_argument("--batch-size", type=_POSITIVE_INT, default=32, help="solvers bench batch size")
    be.add_argument("--repeats", type=_POSITIVE_INT, default=3, help="solvers bench repeats")
    be.set_defaults(func=cmd_bench)

    ce = sub.add_parser("certify", help="print a preset's Lipschitz certificate")
    ce.add_argument("model")
    ce.add_argument("--parts", action="store_true", help="print the per-part breakdown")
    ce.set_defaults(func=cmd_certify)

    mo = sub.add_parser("models", help="list the presets with parameter counts and certificates")
    mo.set_defaults(func=cmd_models)

    da = sub.add_parser("data", help="dataset utilities")
    da_sub = da.add_subparsers(dest="data_command", required=True)
    dl = da_sub.add_parser("download", help="download and verify CIFAR-10")
    dl.add_argument("dataset", choices=["cifar10"])
    dl.add_argument("--dest", required=True)
    dl.set_defaults(func=cmd_data)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lipdeq`` console script and ``python -m lipdeq``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except LipdeqError as err:
        print(f"lipdeq {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:
        print(f"lipdeq {args.command}: error: {_describe_os_error(err, args)}", file=sys.stderr)
        return EXIT_OS_ERROR
    # Everything else (programming errors, out-of-memory RuntimeErrors) keeps its traceback.


def _one_line(message: str) -> str:
    """A multi-line message (a headline, then one indented line per problem) as one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message
    return f"{lines[0]} {'; '.join(lines[1:])}"


def _describe_os_error(err: OSError, args: argparse.Namespace) -> str:
    """``err`` with the path it concerns; a write that fails without one (disk full) names --out."""
    what = err.strerror or str(err)
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    if paths:
        # filename may be a descriptor (an int) for errors on an open file
        return f"{what}: " + " -> ".join(repr(os.fsdecode(p)) if isinstance(p, str | bytes) else str(p) for p in paths)
    out = getattr(args, "out", None)
    return f"{what} (while working in {str(out)!r})" if out else _one_line(str(err))


if __name__ == "__main__":
    raise SystemExit(main())
