"""matplotlib is an optional extra: without it a plot raises an error naming ``lipdeq[plots]``, and
nothing else in the package needs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lipdeq
from lipdeq import demo
from lipdeq.errors import LipdeqError
from lipdeq.optional import MissingExtraError, pyplot

# The demo shrunk to seconds: small widths, tiny subsets, one thread.
SHRINK = ["model.channels=[8,8]", "model.head_channels=[4,4]", "model.final_channels=16", "model.num_groups=4",
          "data.train_subset=64", "data.test_subset=32", "train.num_threads=1"]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make ``import matplotlib`` (and its submodules) fail, as on an install without the extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)


def test_pyplot_without_matplotlib_names_the_extra(no_matplotlib):
    with pytest.raises(MissingExtraError, match=r"lipdeq\[plots\]") as err:
        pyplot()
    assert isinstance(err.value, LipdeqError) and isinstance(err.value, ImportError)


def test_pyplot_with_matplotlib_is_pyplot():
    plt = pyplot()
    assert plt.__name__ == "matplotlib.pyplot"
    assert plt.get_backend().lower() == "agg"  # non-interactive: the demo runs headless


def test_demo_plot_without_matplotlib_raises_and_writes_nothing(no_matplotlib, tmp_path):
    histories = {"a": [{"step_time": 0.1, "loss": 2.0, "forward_nstep_mean": 3.0}]}
    with pytest.raises(MissingExtraError, match=r"lipdeq\[plots\]"):
        demo.plot(histories, tmp_path / "demo.png")
    assert not (tmp_path / "demo.png").exists()


def test_demo_without_matplotlib_still_compares_and_says_the_plot_was_skipped(no_matplotlib, tmp_path, capsys):
    # The comparison is what a user runs the demo for: minutes of training must not be lost to a
    # missing plotting library, so the demo finishes and says why there is no figure.
    rows = demo.run_demo(tmp_path, steps=1, extra_overrides=SHRINK)
    out = capsys.readouterr().out
    assert "train-step speed-up of lipmdeq_tiny over mdeq_tiny" in out
    assert "plot skipped" in out and "lipdeq[plots]" in out
    assert not (tmp_path / "demo.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())[0]["model"] == rows[0]["model"] == "lipmdeq_tiny"


def test_every_module_imports_without_matplotlib():
    # A fresh interpreter, so that no earlier import of matplotlib hides a module-level import.
    code = (
        "import sys, importlib, pkgutil\n"
        "sys.modules['matplotlib'] = None\n"
        "import lipdeq\n"
        "names = [m.name for m in pkgutil.walk_packages(lipdeq.__path__, 'lipdeq.') if m.name != 'lipdeq.__main__']\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(lipdeq.__path__[0]))
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 20  # the walk really found the package's modules
