"""The multiscale DEQ classifier: stem -> equilibrium of the multiscale layer -> head."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipdeq.errors import LipdeqError
from lipdeq.gradients import fixed_point, jacobian_frobenius_penalty
from lipdeq.gradients.budgeted import budget_counts
from lipdeq.lipschitz import LipschitzCertificate
from lipdeq.models.certify import Mode, layer_certificate
from lipdeq.models.compiled import CompiledStep, layer_step
from lipdeq.models.config import ModelConfig
from lipdeq.models.head import ClassificationHead, cap_explicit_parts, make_injection, make_stem
from lipdeq.models.layer import MultiscaleLayer
from lipdeq.models.network_certificate import network_bound
from lipdeq.models.robustness import certified_radius_from_logits
from lipdeq.models.running_certificate import RunningCertificate
from lipdeq.solvers import Solution, SolverWarning


class NotAContractionError(LipdeqError, ValueError):
    """Raised by a strict certificate whose bound is not below 1."""


class MultiscaleDEQ(nn.Module):
    """MDEQ / Lipschitz MDEQ image classifier (the layer and its certificate: docs/MATH.md sections 2 to 4).

    ``model(x)`` returns logits. After each forward, :attr:`last_solution` holds the forward
    solver's per-sample statistics; after the backward pass its ``.backward`` field holds the
    adjoint solve's. :meth:`solver_stats` summarises both.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c0 = cfg.channels[0]
        norm, gcap = cfg.explicit_norm, cfg.gn_cap
        self.stem = make_stem(cfg.in_channels, c0, norm, gcap)
        use_injection = cfg.injection == "conv" or (cfg.injection == "auto" and cfg.num_branches > 2)
        self.injection = make_injection(c0, norm, gcap) if use_injection else None
        self.layer = MultiscaleLayer(cfg)
        self.head = ClassificationHead(cfg.channels, cfg.head_channels, cfg.final_channels, cfg.num_classes,
                                       norm, gcap)
        if cfg.explicit_cap is None:
            self._init_explicit_parts()
        else:
            # Capped explicit parts start at their caps: N(0, 0.01) would start every conv far below
            # it, and without BatchNorm nothing would restore the vanishing signal.
            cap_explicit_parts(self.stem, self.injection, self.head, self.layer.sizes, cfg.explicit_cap,
                               cfg.cap_power_iterations)
        self.last_solution: Solution | None = None
        self._cert_cache: tuple[Any, LipschitzCertificate] | None = None
        # not a submodule: derived state, outside the state dict (reset at checkpoints, see its docstring)
        self.running_certificate = RunningCertificate(self.layer, cfg.certificate_refresh)
        self.last_lipschitz: float | None = None
        self.budget = cfg.budget if cfg.is_lipschitz else "residual"
        if cfg.budget != self.budget:
            warnings.warn(SolverWarning(
                f"{cfg.name}: budget='certified' needs a certificate (norm='mean_only' and a conv_cap; got "
                f"norm={cfg.norm!r}, conv_cap={cfg.conv_cap}): this model solves with residual checks"
            ), stacklevel=2)
        self.compiled_step: CompiledStep | None = None  # set by compile_f()

    def _init_explicit_parts(self) -> None:
        """MDEQ's init for stem, injection and head: conv N(0, 0.01), BN weight 1 and bias 0."""
        for part in (self.stem, self.injection, self.head):
            if part is None:
                continue
            for m in part.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, 0.01)
                    if m.bias is not None:
                        nn.init.normal_(m.bias, 0.0, 0.01)
                elif isinstance(m, nn.BatchNorm2d) and m.weight is not None:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ input and problem
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for a batch that is not ``(B, in_channels, S, S)``, finite, floating."""
        cfg = self.cfg
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected an image tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"expected images of shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), "
                f"got {x.dim()} dimensions {tuple(x.shape)}"
            )
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"expected {cfg.image_size}x{cfg.image_size} images, got {x.shape[2]}x{x.shape[3]}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"empty batch: images of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point images, got dtype {x.dtype}")
        weight = next(self.parameters())
        if x.device.type == "meta":
            raise ValueError("images on the meta device hold no data: move them to the model's device "
                             f"({weight.device})")
        if x.device != weight.device:
            raise ValueError(f"images are on device {x.device} but the model is on {weight.device}: "
                             f"use x.to({str(weight.device)!r})")
        if x.dtype != weight.dtype:
            raise ValueError(f"images have dtype {x.dtype} but the model's weights are {weight.dtype}: "
                             f"use x.to({weight.dtype}) or model.to({x.dtype}) (autocast handles bf16)")
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).flatten(1).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"input images contain NaN or Inf (batch indices {bad[:10]})")

    def injection_of(self, x: torch.Tensor) -> torch.Tensor:
        """The input injection ``u`` of branch 1 (stem, then the optional injection module)."""
        if self.layer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        u = self.stem(x)
        return self.injection(u) if self.injection is not None else u

    def fixed_point_problem(
        self, x: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """The DEQ map of this batch as a function of a flat ``(B, D)`` state, and ``z0 = 0``.

        In training mode this draws the variational dropout masks, which stay fixed for every
        call of the returned ``f``. For speed, call it (and ``f``) inside :meth:`cached_weights`,
        so that weight norm and the operator-norm caps are computed once, not once per call.
        After :meth:`compile_f`, ``f`` runs the compiled step; ``f(z, eager=True)`` runs the layer
        eagerly (for double differentiation, which compiled graphs do not support).
        """
        self.check_input(x)
        u = self.injection_of(x)
        zs = [torch.zeros(x.shape[0], *shape, device=x.device, dtype=x.dtype) for shape in self.layer.shapes]
        if self.training:
            self.layer.reset_dropout(zs, generator=generator)
        layer, step = self.layer, self.compiled_step
        z0 = layer.pack(zs)
        # The solvers' first evaluation is at this z0 (the budgeted forward's f(0), Anderson's first
        # step), where the blocks' first convs give exact zeros and can be skipped. z0 is recognised
        # as itself or a view of it: the same storage, shape and strides, and an unchanged version
        # counter (which views and detached aliases share), so a state written in place never is. Not
        # when z carries a graph: the vector-Jacobian products need the skipped conv's Jacobian. Not under
        # torch.inference_mode either, whose tensors have no version counter.
        zero_key = None if z0.is_inference() else (z0.data_ptr(), z0.shape, z0.stride(), z0._version)

        def f(z: torch.Tensor, *, eager: bool = False) -> torch.Tensor:
            if step is not None and not eager:
                return step(layer, z, u)
            zero = zero_key is not None and (z.data_ptr(), z.shape, z.stride(), z0._version) == zero_key
            zero = zero and not (z.requires_grad and torch.is_grad_enabled())
            return layer_step(layer, z, u, zero_state=zero)

        return f, z0

    @contextlib.contextmanager
    def cached_weights(self) -> Iterator[None]:
        """Compute parametrized weights (weight norm, caps) once for everything inside the block.

        The weights are materialised on entry, in the caller's grad mode, so that a first access
        from inside a ``no_grad`` region (the forward solve, the certificate) cannot cache a weight
        that is cut off from its parameters.
        """
        dtype = next(self.parameters()).dtype
        if dtype in (torch.float16, torch.bfloat16):
            # The caps compute FFT operator norms of the weights, for which torch has no half kernels:
            # without this check the error comes from deep inside torch.fft / view_as_complex.
            raise ValueError(f"the model's weights are {str(dtype).removeprefix('torch.')}: lipdeq models "
                             "compute in float32 or float64; use model.float() and torch.autocast "
                             "(train.amp=bf16) for bfloat16 speed")
        with parametrize.cached():
            for module in self.modules():
                if parametrize.is_parametrized(module):
                    for name in module.parametrizations:
                        getattr(module, name)
            yield

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, *, unrolled: bool = False, return_jac_loss: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits for a batch of images.

        Args:
            x: images ``(B, C, S, S)``, normalised.
            unrolled: MDEQ pretraining mode: apply f ``pretrain_layers`` times from ``z0`` as a
                weight-tied explicit network instead of solving for the equilibrium.
            return_jac_loss: also return the Hutchinson estimate of ``||J_f||_F^2 / dim`` at the
                equilibrium (the Jacobian regulariser of ``mdeq_large_reg``).
        """
        cfg = self.cfg
        with self.cached_weights():
            f, z0 = self.fixed_point_problem(x)
            if unrolled:
                z = z0
                for _ in range(cfg.pretrain_layers):
                    z = f(z)
                self.last_solution = None
            else:
                # The certified constant: in training the running certificate (exact FFT norms every
                # certificate_refresh steps, a perturbation bound between: a few percent of a step);
                # in eval the tightened FFT certificate, cached until the weights change.
                lip = None
                if cfg.is_lipschitz:
                    value = self._training_bound() if self.training else self.lipschitz_bound().value
                    self.last_lipschitz = value
                    # a value >= 1 still goes to a certified budget, whose fallback warning names it
                    lip = value if value < 1.0 or self.budget == "certified" else None
                z, sol = fixed_point(
                    f,
                    z0,
                    solver=cfg.solver,
                    backward=cfg.backward,
                    f_tol=cfg.f_tol,
                    b_tol=cfg.b_tol,
                    f_max_iter=cfg.f_thres,
                    b_max_iter=cfg.b_thres,
                    stop_mode=cfg.stop_mode,
                    lipschitz=lip,
                    budget=self.budget,
                )
                self.last_solution = sol
            jac_loss = None
            if return_jac_loss:
                z_in = z.detach().requires_grad_()
                jac_loss = jacobian_frobenius_penalty(f(z_in, eager=True), z_in, create_graph=self.training)
        logits = self.head(self.layer.unpack(z))
        return (logits, jac_loss) if return_jac_loss else logits

    def _training_bound(self) -> float:
        """The running certificate for this training step, refreshed early when its drift since the
        last refresh would raise the certified budget (more forward evaluations or adjoint terms than
        the refreshed value gives): an exact refresh costs about one evaluation and one
        vector-Jacobian product, which the larger budget would cost on this and the following steps."""
        bound = self.running_certificate(training=True)
        if self.budget == "certified" and not bound.refreshed:
            now, ref = (budget_counts(v, self.cfg.f_tol, self.cfg.b_tol) for v in (bound.value, bound.reference))
            if any(a > b for a, b in zip(now, ref)):
                bound = self.running_certificate(training=True, refresh=True)
        return bound.value

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # .to() / .double() / .cuda() replace the weights: the running certificate's stored copies
        # would be on the old device or dtype
        self.running_certificate.reset()
        return super()._apply(fn, recurse)

    def compile_f(self, mode: str = "default", *, backend: str = "inductor") -> None:
        """Run f through ``torch.compile`` from now on (``train.compile``): one graph per mode, grad
        state, autocast state and batch size, compiled on first use (``lipdeq.models.compiled``)."""
        self.compiled_step = CompiledStep(mode, backend)

    def use_channels_last(self, enabled: bool = True) -> None:
        """Run the convs in channels-last memory format (``train.channels_last``): 4-D parameters
        stored channels-last, images converted on entry, the flat state in NHWC order
        (``layer.channels_last``) so that unpacking it gives channels-last views without a copy."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        with torch.no_grad():  # not self.to(memory_format=...): it refuses the caps' 5-D buffers
            for p in self.parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=fmt)  # the same Parameter objects
        self.layer.channels_last = enabled

    # ------------------------------------------------------------------ certificates and stats
    def _certified_tensors(self) -> list[torch.Tensor]:
        """Everything the weights certificate reads: f's parameters and buffers (the caps' vectors)."""
        return [t.detach() for t in (*self.layer.parameters(), *self.layer.buffers())]

    def _cache_is_current(self) -> bool:
        """True when every certified tensor equals, bitwise, the copy taken with the cached certificate.

        A content comparison, not autograd's ``_version`` counter: writes through ``.data``,
        ``vector_to_parameters`` or ``set_`` do not bump the counter, and a certificate keyed on it
        went stale (it reported the bound of weights four times smaller). The copy costs one
        model's worth of f's parameters; the comparison is one pass over them, far below a forward.
        """
        if self._cert_cache is None:
            return False
        saved = self._cert_cache[0]
        now = self._certified_tensors()
        return len(saved) == len(now) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
            for a, b in zip(saved, now)
        )

    def lipschitz_bound(
        self, *, mode: Mode = "weights", strict: bool = False, part: Literal["layer", "network"] = "layer"
    ) -> LipschitzCertificate:
        """Certified upper bound of Lip(f) in z (l2, eval mode) with a per-part breakdown.

        ``part="network"`` bounds instead the whole classifier, from images in [0, 1] (before the
        normalisation) to logits, l2, eval mode (docs/MATH.md section 9; the breakdown names the
        stem, the equilibrium, the head and its branches); ``strict`` then concerns the layer
        certificate it relies on.

        ``mode="weights"`` certifies the current weights (exact FFT operator norms, chains of
        linear maps bounded jointly, the eval-mode dropout factor: docs/MATH.md section 10.5);
        ``mode="hyper"`` uses only the hyperparameters (every conv at ``conv_cap``, every gamma at
        ``gn_cap``). The value is infinite, with a reason, for a model without a finite bound
        (standard GroupNorm). With ``strict=True`` a bound >= 1 raises NotAContractionError.
        """
        if mode not in ("weights", "hyper"):  # anything else used to certify the weights under its name
            raise ValueError(f"unknown certificate mode {mode!r}: use 'weights' or 'hyper'")
        if part not in ("layer", "network"):
            raise ValueError(f"unknown certificate part {part!r}: use 'layer' or 'network'")
        if part == "network":
            if strict:
                self.lipschitz_bound(mode=mode, strict=True)
            return network_bound(self, mode=mode).certificate
        if mode == "weights":
            if self._cache_is_current():
                cert = self._cert_cache[1]
            else:
                with torch.no_grad():
                    snapshot = [t.clone() for t in self._certified_tensors()]
                    cert = layer_certificate(self.layer, mode="weights")
                self._cert_cache = (snapshot, cert)
        else:
            cert = layer_certificate(self.layer, mode=mode)
        if strict and not cert.value < 1.0:
            why = f" ({cert.reason})" if cert.reason else ""
            raise NotAContractionError(
                f"{self.cfg.name}: certified Lipschitz bound {cert.value:.4g} is not below 1{why}; "
                "convergence is not guaranteed"
            )
        return cert

    def certified_radius(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample certified l2 radius (B,), float64, of the predicted class, in pixel units.

        ``x`` is the normalised batch that ``model(x)`` takes; the radius refers to the image in
        [0, 1] before that normalisation: no perturbation of the [0, 1] image of l2 norm below the
        radius changes the prediction of the true equilibrium classifier (docs/MATH.md section 9.5).
        The model is evaluated in eval mode (restored afterwards); a sample whose solve did not
        converge gets radius 0. A sample counts as certified at eps when it is classified correctly
        and its radius is at least eps.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                logits = self(x)
                sol = self.last_solution
                bound = network_bound(self)
        finally:
            self.train(was_training)
        if sol is None:
            return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        return certified_radius_from_logits(logits, bound, sol.error_bound, sol.converged)

    def solver_stats(self) -> dict[str, float]:
        """Summary of the last forward (and backward, once run) solve: :meth:`Solution.summary` with
        the prefixes ``forward`` and ``backward`` (iterations, residuals, converged fraction and
        certified error bounds), plus the work actually done: ``forward_f_evals`` (every evaluation
        of f, the graph-carrying one included; ``nstep`` counts only up to the best iterate) and
        ``backward_vjps`` (vector-Jacobian products of the adjoint solve), and ``lipschitz``, the
        certified constant the forward used (Lipschitz models)."""
        out: dict[str, float] = {}
        fwd = self.last_solution
        if fwd is not None:
            out.update(fwd.summary("forward"))
            out["forward_f_evals"] = float(fwd.n_f_evals + fwd.extra_f_evals)
            if fwd.backward is not None:
                out.update(fwd.backward.summary("backward"))
                out["backward_vjps"] = float(fwd.backward.n_f_evals)
        if self.last_lipschitz is not None:
            out["lipschitz"] = float(self.last_lipschitz)
        return out

    def num_parameters(self, part: str = "all") -> int:
        """Number of parameters of ``"all"`` or of the equilibrium layer ``"f"``."""
        module = self.layer if part == "f" else self
        return sum(p.numel() for p in module.parameters())

