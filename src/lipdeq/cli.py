"""Command line: ``lipdeq {demo, train, eval, bench, certify, models, data}`` (thin wrappers)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


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
        print(json.dumps(_json_safe(summary)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lipdeq.training import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, overrides=_with_data_dir(args.set, args.data_dir),
                                  device=args.device)
    if not args.json:
        for k, v in metrics.items():
            print(f"{k:>28}: {v}")
    print(json.dumps(_json_safe(metrics)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lipdeq.demo import run_demo

    run_demo(out_dir=Path(args.out), data_dir=args.data_dir, seconds_per_model=args.seconds, steps=args.steps)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "solvers":
        from lipdeq.benchmarks import solvers

        print(solvers.format_report(solvers.run(batch_size=args.batch_size, repeats=args.repeats)))
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

    model = create_model(args.model)
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
    demo.add_argument("--seconds", type=float, default=60.0, help="training budget per model (default 60)")
    demo.add_argument("--steps", type=int, default=None, help="fixed number of steps per model instead")
    demo.set_defaults(func=cmd_demo)

    tr = sub.add_parser("train", help="train a preset or YAML config")
    tr.add_argument("--config", required=True, help="preset name (see `lipdeq models`) or YAML file")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--data-dir", help="CIFAR-10 directory (or set LIPDEQ_DATA_DIR)")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    tr.add_argument("--overwrite", action="store_true", help="reuse a directory that holds another run")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or meta.json")
    ev.add_argument("--data-dir")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", action="store_true", help="print only one JSON object")
    ev.set_defaults(func=cmd_eval)

    be = sub.add_parser("bench", help="benchmarks: the paper's claim (default), solvers, memory")
    be.add_argument("what", nargs="?", default="paper", choices=["paper", "solvers", "memory"])
    prof = be.add_mutually_exclusive_group()
    prof.add_argument("--quick", action="store_true", help="CPU-sized profile (default)")
    prof.add_argument("--full", action="store_true", help="the GPU recipe: full training of both models")
    be.add_argument("--data-dir")
    be.add_argument("--out", default="runs/bench")
    be.add_argument("--device", default=None)
    be.add_argument("--batch-size", type=int, default=32, help="solvers bench batch size")
    be.add_argument("--repeats", type=int, default=3, help="solvers bench repeats")
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
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"lipdeq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
