"""The embedded synthetic dataset: deterministic, balanced, not trivial from colour, yet learnable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lipdeq.data import make_synthetic, validate_arrays


@pytest.fixture(scope="module")
def small_sets() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return make_synthetic(2000, "train", seed=0), make_synthetic(1000, "test", seed=0)


def test_shapes_dtypes_and_range(small_sets) -> None:
    (x, y), _ = small_sets
    validate_arrays(x, y, what="synthetic")
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(x.min()) < 30 and int(x.max()) > 225  # uses the dynamic range
    assert x.float().std(dim=(1, 2, 3)).min() > 2.0  # no constant images


def test_deterministic_and_prefix_stable() -> None:
    a = make_synthetic(1500, "train", seed=3)
    b = make_synthetic(1500, "train", seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = make_synthetic(1023, "train", seed=3)
    assert torch.equal(c[0], a[0][:1023]) and torch.equal(c[1], a[1][:1023])


def test_splits_and_seeds_differ() -> None:
    train = make_synthetic(200, "train", seed=0)[0]
    test = make_synthetic(200, "test", seed=0)[0]
    other = make_synthetic(200, "train", seed=1)[0]
    seen = {img.numpy().tobytes() for img in train}
    for rival in (test, other):
        assert not torch.equal(train, rival)
        assert not seen & {img.numpy().tobytes() for img in rival}  # no image repeated across streams


@pytest.mark.parametrize("n", [1000, 95, 7])
def test_balanced(n: int) -> None:
    counts = torch.bincount(make_synthetic(n, "test", seed=2)[1], minlength=10)
    assert counts.sum() == n and int(counts.max() - counts.min()) <= 1


def test_rejects_bad_arguments() -> None:
    for bad in (0, -5):
        with pytest.raises(ValueError, match="n must be"):
            make_synthetic(bad, "train")
    for bad in (2.0, True):  # the wrong type: TypeError, as everywhere (lipdeq.checks)
        with pytest.raises(TypeError, match="n must be"):
            make_synthetic(bad, "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split"):
        make_synthetic(10, "val")  # type: ignore[arg-type]


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def test_mean_colour_is_not_informative(small_sets) -> None:
    """Multinomial logistic regression on the per-channel mean colour stays near chance."""
    (xtr, ytr), (xte, yte) = small_sets
    ftr, fte = xtr.float().mean(dim=(2, 3)) / 255, xte.float().mean(dim=(2, 3)) / 255
    mu, sd = ftr.mean(0), ftr.std(0)
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    torch.manual_seed(0)
    w = torch.zeros(3, 10, requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(ftr @ w + b, ytr).backward()
        opt.step()
    # The optimiser did fit the training data at least as well as a constant predictor.
    assert F.cross_entropy(ftr @ w + b, ytr).item() <= torch.log(torch.tensor(10.0)).item() + 1e-3
    assert _accuracy(fte @ w + b, yte) < 0.40


def _fourier_features(x: torch.Tensor) -> torch.Tensor:
    """Log magnitude spectrum of the standardised grey image, pooled 2x2 (translation invariant)."""
    g = x.float().mean(1)
    g = (g - g.mean(dim=(1, 2), keepdim=True)) / (g.std(dim=(1, 2), keepdim=True) + 1e-3)
    mag = torch.fft.fft2(g).abs()[:, :16, :]
    return torch.log1p(F.avg_pool2d(mag[:, None], 2).flatten(1))


def test_learnable_from_fixed_features(small_sets) -> None:
    """Ridge least squares on Fourier magnitude features is clearly above chance (10%)."""
    (xtr, ytr), (xte, yte) = small_sets
    ftr, fte = _fourier_features(xtr), _fourier_features(xte)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    a = torch.cat([(ftr - mu) / sd, torch.ones(len(ftr), 1)], 1).double()
    at = torch.cat([(fte - mu) / sd, torch.ones(len(fte), 1)], 1).double()
    targets = F.one_hot(ytr, 10).double()
    w = torch.linalg.solve(a.T @ a + 10.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ targets)
    assert _accuracy(at @ w, yte) > 0.30
