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
_COUNT = _checked(int, lambda v: check_int("value", v, minimum=0))


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

    overrides = _with_data_dir(args.set, args.data_dir)
    if args.precise_bn is not None:  # after --set: the option wins
        overrides.append(f"train.eval_precise_bn={args.precise_bn}")
    metrics = evaluate_checkpoint(args.checkpoint, overrides=overrides, device=args.device, robust=args.robust)
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
        figures = solvers.run(batch_size=args.batch_size or 32, repeats=args.repeats, device=args.device or "cpu")
        print(solvers.format_report(figures))
    elif args.what == "profile":
        from lipdeq.benchmarks import profile

        print(profile.format_report(profile.run(args.preset, batch_size=args.batch_size or 32, steps=args.steps,
                                                device=args.device, overrides=args.set)))
    elif args.what == "memory":
        from lipdeq.benchmarks import memory

        print(memory.format_report(memory.run(device=args.device)))
    elif args.what == "gpu":
        from lipdeq.benchmarks import gpu, gpu_report

        results = gpu.run(Path(args.out), dry_run=args.dry_run, data_dir=args.data_dir, device=args.device,
                          train_seconds=args.train_seconds, budget_s=args.budget_seconds)
        print(gpu_report.format_report(results))
    elif args.what == "accuracy":
        from lipdeq.benchmarks import accuracy

        accuracy.run(Path(args.out), minutes=args.minutes, eval_images=args.eval_images,
                     final_images=args.final_images, evals=args.evals, data_dir=args.data_dir,
                     models=args.models.split(","), mode=args.mode, device=args.device, threads=args.threads,
                     batch_size=args.batch_size, bn_images=args.bn_images, spacing=args.spacing,
                     pretrain_fraction=args.pretrain_fraction, match_snapshots=args.epoch_snapshots,
                     overrides=args.set)
    else:
        from lipdeq.benchmarks import paper

        paper.run(out_dir=Path(args.out), profile="full" if args.full else "quick", data_dir=args.data_dir,
                  device=args.device)
    return 0


class CertifyUsageError(LipdeqError, ValueError):
    """``lipdeq certify`` got a combination of arguments it cannot run."""


def _check_certify_args(args: argparse.Namespace) -> None:
    if (args.model is None) == (args.checkpoint is None):
        raise CertifyUsageError("give a preset name or --checkpoint PATH (one of the two)")
    if (args.solve is None) != (args.target is None):
        raise CertifyUsageError("--solve KEY and --target L go together")
    if args.checkpoint is not None and args.solve is not None:
        raise CertifyUsageError("--solve works on a preset's hyperparameters, not on --checkpoint")
    if args.model is not None and (args.images is not None or args.data_dir is not None):
        raise CertifyUsageError("--images and --data-dir go with --checkpoint")


def cmd_certify(args: argparse.Namespace) -> int:
    _check_certify_args(args)
    if args.checkpoint is not None:
        from lipdeq.benchmarks.certify import certify_checkpoint, format_report

        result = certify_checkpoint(args.checkpoint, data_dir=args.data_dir, images=args.images or 16,
                                    device=args.device, iters=args.iters)
        print(json.dumps(json_safe(result)) if args.json else format_report(result))
        return 0
    if args.solve is not None:
        from lipdeq.models import solve_hyperparameter

        sol = solve_hyperparameter(args.model, args.solve, args.target)
        if args.json:
            print(sol.to_json())
        else:
            note = "" if sol.binding else "  (not binding: the bound stays below the target on the whole range)"
            print(f"{args.model}: largest {sol.key} = {sol.value!r} with hyperparameter bound "
                  f"Lip(f) <= {sol.bound!r} < {sol.target!r}{note}")
        return 0
    from lipdeq.models import create_model

    model = create_model(args.model)  # an unknown name is a ConfigError: one line naming the presets
    certs = {mode: model.lipschitz_bound(mode=mode) for mode in ("hyper", "weights")}
    if args.json:
        print(json.dumps({"model": args.model, **{mode: c.to_dict() for mode, c in certs.items()}}))
        return 0
    for mode, cert in certs.items():
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


def _add_accuracy_options(be: argparse.ArgumentParser) -> None:
    """The options of ``lipdeq bench accuracy`` (see :func:`lipdeq.benchmarks.accuracy.run`)."""
    acc = be.add_argument_group("accuracy profile (lipdeq bench accuracy: time to accuracy on real CIFAR-10)")
    acc.add_argument("--minutes", type=_POSITIVE_SECONDS, default=40.0, help="training budget per model (default 40)")
    acc.add_argument("--eval-images", type=_POSITIVE_INT, default=1000,
                     help="test images of each curve point (default 1000)")
    acc.add_argument("--final-images", type=_COUNT, default=10000,
                     help="test images of the final evaluation (default 10000; 0: none)")
    acc.add_argument("--evals", type=_checked(int, lambda v: check_int("value", v, minimum=2)), default=10,
                     help="evaluated snapshots per run (default 10)")
    acc.add_argument("--models", default="lipmdeq_tiny,mdeq_tiny", help="LIPSCHITZ,BASELINE presets")
    acc.add_argument("--mode", choices=["parallel", "sequential"], default=None,
                     help="both runs at once, one process each (default on CPU), or one after the other (on CUDA)")
    acc.add_argument("--threads", type=_POSITIVE_INT, default=None,
                     help="torch threads per run (default: 1 in parallel mode, all cores in sequential mode)")
    acc.add_argument("--bn-images", type=_POSITIVE_INT, default=256,
                     help="training images of the precise-BN re-estimation before every evaluation (default 256)")
    acc.add_argument("--spacing", choices=["geometric", "linear"], default="geometric",
                     help="evaluation times along training (default geometric, budget/32 to the budget)")
    acc.add_argument("--pretrain-fraction", type=_checked(float, lambda v: check_real(
        "value", v, above=0.0, inclusive=True, below=1.0, below_inclusive=True)), default=None,
        help="share of the budget a preset that pretrains (MDEQ) trains unrolled (default: its share of the "
             "preset's schedule)")
    acc.add_argument("--epoch-snapshots", type=_COUNT, default=100,
                     help="snapshots per run among which the equal-epochs point is picked (default 100)")
    acc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key of both models")


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
    ev.add_argument("--robust", action="store_true",
                    help="also certified accuracy at l2 eps 36/255, 72/255, 108/255 (pixel units)")
    ev.add_argument("--precise-bn", type=_COUNT, default=None, metavar="N",
                    help="re-estimate BatchNorm statistics on N training images first (0: off; default: the "
                         "run's train.eval_precise_bn); the checkpoint is not changed")
    ev.set_defaults(func=cmd_eval)

    be = sub.add_parser("bench", help="benchmarks: the paper's claim (default), solvers, memory, accuracy, gpu, "
                        "profile")
    be.add_argument("what", nargs="?", default="paper",
                    choices=["paper", "solvers", "memory", "accuracy", "gpu", "profile"])
    prof = be.add_mutually_exclusive_group()
    prof.add_argument("--quick", action="store_true", help="CPU-sized profile (default)")
    prof.add_argument("--full", action="store_true", help="the GPU recipe: full training of both models")
    be.add_argument("--data-dir", help="CIFAR-10 directory (default: $LIPDEQ_DATA_DIR; with neither, the "
                    "paper bench uses the embedded synthetic set and says so, the accuracy profile refuses)")
    be.add_argument("--out", default="runs/bench")
    be.add_argument("--device", type=_device, default=None)
    be.add_argument("--batch-size", type=_POSITIVE_INT, default=None,
                    help="solvers bench batch size (default 32); accuracy: training batch size (default: presets')")
    be.add_argument("--repeats", type=_POSITIVE_INT, default=3, help="solvers bench repeats")
    _add_accuracy_options(be)
    pr = be.add_argument_group("step profile (lipdeq bench profile: where a training step and an inference "
                               "batch spend their time)")
    pr.add_argument("--preset", default="lipmdeq_tiny", help="preset to profile (default lipmdeq_tiny; batch "
                    "size from --batch-size, default 32; overrides from --set)")
    pr.add_argument("--steps", type=_POSITIVE_INT, default=5, help="timed steps (default 5, after 2 warm-up steps)")
    gpu = be.add_argument_group("GPU check (lipdeq bench gpu: one CUDA device, at most 8 minutes)")
    gpu.add_argument("--dry-run", action="store_true", help="the same run, tiny, on the CPU, in seconds")
    gpu.add_argument("--train-seconds", type=_POSITIVE_SECONDS, default=None,
                     help="training budget per model (default 150; less when the deadline needs it)")
    gpu.add_argument("--budget-seconds", type=_POSITIVE_SECONDS, default=480.0,
                     help="global deadline of the whole run (default 480)")
    be.set_defaults(func=cmd_bench)

    ce = sub.add_parser("certify", help="a preset's Lipschitz certificate, a solved hyperparameter, or a "
                        "checkpoint's certificate against empirical estimates")
    ce.add_argument("model", nargs="?", help="preset name (or give --checkpoint)")
    ce.add_argument("--parts", action="store_true", help="print the per-part breakdown")
    ce.add_argument("--solve", choices=["conv_cap", "relu_slope", "alpha", "beta", "gn_cap"],
                    help="solve for the largest value of this key whose hyperparameter bound is below --target")
    ce.add_argument("--target", type=_checked(float, lambda v: check_real("value", v, above=0.0)),
                    help="target Lipschitz constant for --solve (e.g. 0.9)")
    ce.add_argument("--checkpoint", help="run directory, checkpoint directory or meta.json: certificate of the "
                    "trained weights, largest empirical estimate of Lip(f) and their ratio")
    ce.add_argument("--data-dir", help="CIFAR-10 directory for --checkpoint (default: the checkpoint's data config)")
    ce.add_argument("--images", type=_POSITIVE_INT, default=None,
                    help="test images whose fixed points are the data points (default 16)")
    ce.add_argument("--iters", type=_POSITIVE_INT, default=50,
                    help="power iterations per point and ascent steps per pair (default 50)")
    ce.add_argument("--device", type=_device, default=None)
    ce.add_argument("--json", action="store_true", help="print one JSON object")
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
