"""The README's "Your own contractive DEQ" example runs as printed, and its certificate holds."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from lipdeq.lipschitz.empirical import empirical_lipschitz

README = Path(__file__).resolve().parents[1] / "README.md"


def example_code() -> str:
    """The first python block after the heading "## Your own contractive DEQ"."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Your own contractive DEQ")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match is not None, "the README section has no python block"
    return match.group(1)


def test_readme_example_runs_and_its_certificate_bounds_empirical_estimates(capsys):
    namespace: dict = {}
    exec(compile(example_code(), "README.md:Your own contractive DEQ", "exec"), namespace)  # noqa: S102
    cert, layer, sol = namespace["cert"], namespace["layer"], namespace["sol"]
    assert cert.value < 1 and sol.all_converged and sol.error_bound is not None
    hyper = layer.lipschitz_bound(mode="hyper").value
    assert cert.value <= hyper  # the weights' certificate is at most the caps' worst case
    c, s = namespace["C"], namespace["S"]
    f64 = copy.deepcopy(layer).double().eval()
    for p in f64.parameters():
        p.requires_grad_(False)
    cert64 = f64.lipschitz_bound().value  # the cap recomputed in float64: the effective weight moves by rounding
    assert abs(cert64 - cert.value) <= 1e-6 * cert.value
    f = lambda z: f64(z.view(-1, c, s, s)).flatten(1)  # noqa: E731  (u does not depend on z)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, c * s * s, generator=gen, dtype=torch.float64)
    emp = empirical_lipschitz(f, x, iters=40, ascent_steps=40, generator=gen)
    assert 0 < emp.value <= cert64
    assert "0.81" in capsys.readouterr().out  # the hyperparameter bound the README prints
