"""Worker process of the accuracy profile: ``python -m lipdeq.benchmarks.accuracy.worker {train,eval} SPEC``.

``train``: one :class:`~.training.RunSpec` (JSON); writes ``ready`` beside the spec once its data is
loaded, waits for ``go``, trains, writes ``run.json``. ``eval``: a list of evaluation jobs, the
saved image sets and precise-BN batches, writes the results (JSON) where the spec says. On a
failure the traceback goes to ``error.txt`` beside the spec and the exit status is 1.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lipdeq.atomic import atomic_write
from lipdeq.benchmarks.accuracy.running import ERROR_FILE, GO_FILE, READY_FILE, EvalJob, evaluate_job, load_eval_data
from lipdeq.benchmarks.accuracy.training import RunSpec, train_for_budget

__all__ = ["main"]


def _train(spec: dict[str, Any], folder: Path) -> None:
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "config"}
    run = RunSpec(config=spec["config"], **fields)

    def start() -> None:
        (folder / READY_FILE).touch()
        while not (folder / GO_FILE).exists():
            time.sleep(0.002)

    train_for_budget(run, start=start)


def _eval(spec: dict[str, Any]) -> None:
    if spec.get("threads") is not None:
        torch.set_num_threads(int(spec["threads"]))
    sets, calib = load_eval_data(spec["data"])
    out = []
    for job in spec["jobs"]:
        r = evaluate_job(EvalJob(**job), sets, calib, spec.get("device"))
        out.append(r)
        if spec.get("verbose"):
            print(f"  {r['name']} step {r['step']} on {r['num_images']} images: accuracy {r['accuracy']:.3f}, "
                  f"{1e3 * r['seconds_per_image']:.1f} ms/image, {r['job_seconds']:.1f} s", flush=True)
    atomic_write(spec["out"], json.dumps(out).encode("utf-8"))  # IPC: Infinity and NaN round-trip


def main(argv: list[str] | None = None) -> int:
    """Run one worker; 0 on success, 1 (traceback in ``error.txt``) on a failure."""
    kind, path = (sys.argv[1:] if argv is None else argv)[:2]
    folder = Path(path).parent
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        if kind == "train":
            _train(spec, folder)
        elif kind == "eval":
            _eval(spec)
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
    except BaseException:
        (folder / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
