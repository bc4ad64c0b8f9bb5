"""A parametrisation that caps the operator norm of the weight a convolution actually uses.

``OperatorNormCap`` is registered on ``conv.weight`` with ``torch.nn.utils.parametrize``, after any
existing parametrisation (typically ``torch.nn.utils.parametrizations.weight_norm``), so the forward
uses ``cap(weight_norm(g, v))``: the cap constrains the effective weight, and no optimizer step on
g or v can undo it (docs/MATH.md section 6). Like ``torch.nn.utils.parametrizations.spectral_norm``
it keeps a persistent power-iteration state, advances it a few steps per forward in training mode
(under ``no_grad``), estimates the norm sigma with gradient and returns ``W / max(1, sigma / cap)``.
Unlike it, sigma is the norm of the convolution OPERATOR for the real input shape, not of the
reshaped kernel matrix, which is no bound of it (docs/MATH.md section 5.4).

The operator whose norm is capped is the circular convolution on the grid ``N = n + 2p`` (rounded up
to a multiple of the stride) whose exact norm is the FFT certificate
:func:`lipdeq.lipschitz.conv_operator_norm` (docs/MATH.md section 5). It is block-diagonal in the
Fourier domain, so the power iteration runs independently on every (polyphase) DFT block, with one
persistent vector per frequency, and sigma is the max over frequencies. Each block is a small
c_out x (s^2 c_in) matrix with a usually clear spectral gap, so a few steps give sigma to ~1e-6 even
after large weight changes, and the capped weight's certificate is the cap. (A power iteration with
``F.conv2d`` / ``F.conv_transpose2d`` on one grid-shaped vector converges slowly, because the
singular values of neighbouring frequencies are close; the tests keep it as a reference.)

Wrap a DEQ forward in ``torch.nn.utils.parametrize.cached()`` so the cap (and its power iteration)
runs once per forward, not once per solver iteration.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lipdeq.checks import check_int, check_real
from lipdeq.lipschitz.operator_norm import (
    _effective_kernel,
    _pair,
    circular_grid_size,
    conv_padding,
    polyphase_blocks_freq_first,
    polyphase_grid,
)

__all__ = ["OperatorNormCap", "apply_operator_norm_cap", "effective_weight", "find_operator_norm_cap"]


class OperatorNormCap(nn.Module):
    """Parametrisation ``W -> W / max(1, sigma(W) / max_norm)``, sigma = per-frequency power iteration.

    The geometry (input size, channels, kernel, stride, padding, dilation, groups) is that of the
    convolution it is registered on. The buffer ``v`` holds one complex c_in-vector per coarse DFT
    frequency, stored as real (groups, s_h*s_w*c_in/groups, M_h, M_w // 2 + 1, 2); it is saved in
    the state dict and moves with ``.to()``. In training mode each call runs ``n_power_iterations``
    steps of ``v <- B^H B v / ||B^H B v||`` on every DFT block B of the detached weight; in eval
    mode the stored ``v`` is reused. sigma = ``max_nu ||B(nu) v(nu)|| / sqrt(s_h s_w)`` is
    differentiable in W.
    """

    v: Tensor
    last_sigma: Tensor

    def __init__(
        self,
        max_norm: float,
        input_size: int | tuple[int, int],
        in_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.max_norm = check_real("max_norm", max_norm, above=0.0)
        self.n_power_iterations = check_int("n_power_iterations", n_power_iterations, minimum=0)
        check_int("in_channels", in_channels, minimum=1)
        self.input_size = _pair(input_size, "input_size", 1)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.groups = check_int("groups", groups, minimum=1)
        self.eps = float(eps)
        if in_channels % self.groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels}")
        k_eff = tuple(_effective_kernel(self.kernel_size[i], self.dilation[i]) for i in range(2))
        grid = [circular_grid_size(self.input_size[i], k_eff[i], self.padding[i], self.stride[i]) for i in range(2)]
        self.grid_size: tuple[int, int] = (grid[0], grid[1])
        self.dft_grid = polyphase_grid(k_eff, self.grid_size, self.stride)
        m_h, m_w = self.dft_grid[0] // self.stride[0], self.dft_grid[1] // self.stride[1]
        ci_poly = self.stride[0] * self.stride[1] * in_channels // self.groups
        shape = (self.groups, ci_poly, m_h, m_w // 2 + 1, 2)
        gen_dev = generator.device if generator is not None else device
        v = torch.randn(shape, generator=generator, dtype=dtype or torch.float32, device=gen_dev)
        v = v / v.square().sum(dim=(1, -1), keepdim=True).sqrt().clamp_min(eps)
        self.register_buffer("v", v if device is None else v.to(device))
        self.register_buffer("last_sigma", torch.zeros((), dtype=dtype or torch.float32, device=device),
                             persistent=False)
        self.n_updates = 0
        # eval mode: (the weight seen, its top block (g, r, c, vector), its exact sigma, the capped weight)
        self._eval_state: tuple[Tensor, tuple | None, Tensor, Tensor | None] | None = None

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        max_norm: float,
        input_size: int | tuple[int, int],
        n_power_iterations: int = 1,
        generator: torch.Generator | None = None,
    ) -> OperatorNormCap:
        """Build a cap with the geometry, device and dtype of ``conv`` (zero padding only)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"only padding_mode='zeros' is supported, got {conv.padding_mode!r}")
        w = conv.weight
        return cls(
            max_norm, input_size, conv.in_channels, conv.kernel_size, conv.stride, conv_padding(conv),
            conv.dilation, conv.groups, n_power_iterations,
            device=w.device, dtype=w.dtype, generator=generator,
        )

    def _blocks(self, weight: Tensor) -> Tensor:
        """DFT blocks (G, M_h, L_w, co_g, P), frequencies first and contiguous, of the detached weight."""
        w = weight.detach()
        return polyphase_blocks_freq_first(w, self.dft_grid, self.stride, self.dilation, self.groups)

    def _v_columns(self, dtype: torch.dtype) -> Tensor:
        """The stored vectors ``self.v`` (buffer layout (G, P, M_h, L_w, 2)) as complex columns
        (G, M_h, L_w, P, 1), the layout the batched products with the blocks take."""
        v = self.v
        # always a fresh copy: a graph that saved it must not see later power steps on the buffer
        return torch.view_as_complex(v.to(dtype).permute(0, 2, 3, 1, 4).clone(memory_format=torch.contiguous_format)
                                     ).unsqueeze(-1)

    def _store(self, columns: Tensor) -> None:
        """Write complex columns (G, M_h, L_w, P, 1) back into the buffer layout of ``self.v``."""
        self.v.copy_(torch.view_as_real(columns.squeeze(-1)).permute(0, 3, 1, 2, 4))

    @staticmethod
    def _argmax_frequency(values: Tensor) -> tuple[int, int, int]:
        """``(g, r, c)`` of the largest entry of a (G, M_h, L_w) tensor."""
        flat = int(torch.argmax(values))
        g, rest = divmod(flat, values.shape[1] * values.shape[2])
        r, c = divmod(rest, values.shape[2])
        return g, r, c

    def _top_frequency(self, v: Tensor, blocks: Tensor) -> tuple[int, int, int]:
        """``(g, r, c)`` of the DFT block maximising ``||B(nu) v(nu)||`` (``v``: columns; no grad)."""
        with torch.no_grad():
            return self._argmax_frequency((blocks @ v).abs().square().sum(dim=(-2, -1)))

    def _block_sigma(self, weight: Tensor, g: int, r: int, c: int, vec: Tensor) -> Tensor:
        """``||B(nu) vec|| / sqrt(s_h s_w)`` for the one DFT block ``(g, r, c)``, differentiable in
        ``weight``: the block is a linear function of the kernel (its taps times their DFT phases at
        the s_h s_w fine frequencies aliasing onto nu), so this costs c_out c_in k^2 s^2 products,
        far below a convolution on the grid."""
        rows = torch.tensor([r], device=weight.device)
        block = polyphase_blocks_freq_first(weight, self.dft_grid, self.stride, self.dilation, self.groups,
                                            coarse_rows=rows)[g, 0, c]  # (co_g, P)
        sq = (block @ vec.to(block.dtype)).abs().square().sum()
        return sq.clamp_min(self.eps**2).sqrt() / math.sqrt(self.stride[0] * self.stride[1])

    def _fft_sigma(self, weight: Tensor, v: Tensor, blocks: Tensor) -> Tensor:
        """``max_nu ||B(nu) v(nu)|| / sqrt(s_h s_w)``, differentiable in ``weight``.

        The maximising frequency is found without grad on the precomputed blocks; the
        differentiable value is then that one block's norm on ``v(nu)`` (:meth:`_block_sigma`).
        """
        g, r, c = self._top_frequency(v, blocks)
        return self._block_sigma(weight, g, r, c, v[g, r, c, :, 0])

    @torch.no_grad()
    def power_step(self, weight: Tensor, n_steps: int = 1, blocks: Tensor | None = None) -> None:
        """Advance the stored vectors by ``n_steps`` power-iteration steps on ``weight`` (no grad).

        ``blocks``: the DFT blocks of ``weight`` if already computed.
        """
        w = weight.detach()
        blocks = self._blocks(w) if blocks is None else blocks
        self._store(self._power(blocks, self._v_columns(w.dtype), n_steps))
        self.n_updates += 1

    def _power(self, blocks: Tensor, v: Tensor, n_steps: int) -> Tensor:
        """``n_steps`` of ``v <- B^H B v / ||B^H B v||`` on every block (``v``: columns (G, M_h, L_w, P, 1);
        a zero block keeps ``v``)."""
        for _ in range(n_steps):
            # B^H y as (y^H B)^H: the conjugate transpose of the small factor, not of the blocks (a
            # conjugated view of the blocks would be materialised by the batched product)
            z = ((blocks @ v).mH @ blocks).mH  # (G, M_h, L_w, P, 1)
            nrm = z.abs().square().sum(dim=-2, keepdim=True).sqrt()
            ok = torch.isfinite(nrm) & (nrm > self.eps)  # a zero block keeps its current direction
            v = torch.where(ok, z / nrm.clamp_min(self.eps), v)
        return v

    @torch.no_grad()
    def warm_up(self, weight: Tensor) -> float:
        """Set the vectors to the exact top right singular vector of every DFT block; return sigma.

        Exact up to rounding (eigenvectors of the smaller Gram matrix of each block), no iterations.
        """
        w = weight.detach()
        blocks = self._blocks(w)
        self._exact_init(blocks)
        self.n_updates = 0
        return float(self.sigma(w, blocks))

    @torch.no_grad()
    def _exact_init(self, blocks: Tensor) -> None:
        """Set every frequency's vector to its block's top right singular vector."""
        self._store(self._exact_vectors(blocks))

    @torch.no_grad()
    def _exact_vectors(self, blocks: Tensor) -> Tensor:
        """The top right singular vector of every DFT block, as columns (G, M_h, L_w, P, 1) (a block whose
        eigendecomposition is not finite keeps the stored vector)."""
        old = self._v_columns(blocks.real.dtype)[..., 0]  # (G, M_h, L_w, P)
        b = blocks  # (G, M_h, L_w, co_g, P)
        finite = torch.isfinite(b).all(dim=-1).all(dim=-1)[..., None]  # (G, M_h, L_w, 1)
        b = torch.where(finite[..., None], b, 0.0)
        try:
            if b.shape[-1] <= b.shape[-2]:
                vec = torch.linalg.eigh(b.mH @ b)[1][..., -1]  # (G, M_h, L_w, P)
            else:
                u = torch.linalg.eigh(b @ b.mH)[1][..., -1:]  # (G, M_h, L_w, co_g, 1)
                vec = (b.mH @ u)[..., 0]
                vec = vec / vec.abs().square().sum(dim=-1, keepdim=True).sqrt().clamp_min(self.eps)
        except torch.linalg.LinAlgError:
            # LAPACK gave up on some Gram matrix (repeated eigenvalues): converge the power
            # iteration instead, from the stored vectors
            vec = self._power(blocks.nan_to_num(), old[..., None], 200)[..., 0]
        ok = torch.isfinite(vec).all(dim=-1, keepdim=True) & finite
        return torch.where(ok, vec.to(old.dtype), old).unsqueeze(-1)

    def sigma(self, weight: Tensor, blocks: Tensor | None = None) -> Tensor:
        """Current estimate ``max_nu ||B(nu) v(nu)|| / sqrt(s_h s_w)`` (a lower bound of the capped
        operator's norm), differentiable in ``weight``; ``blocks``: precomputed DFT blocks."""
        if blocks is None:
            with torch.no_grad():
                blocks = self._blocks(weight)
        return self._fft_sigma(weight, self._v_columns(weight.dtype), blocks)

    def forward(self, weight: Tensor) -> Tensor:
        """Return ``weight / max(1, sigma / max_norm)``, advancing the power iteration in training mode
        (in eval mode: exact sigma of this weight, the result reused while the weight is unchanged)."""
        if not self.training:
            return self._eval_forward(weight)
        self._eval_state = None
        with torch.no_grad():
            blocks = self._blocks(weight)
        if self.training and self.n_power_iterations > 0:
            self.power_step(weight, self.n_power_iterations, blocks)
        sigma = self.sigma(weight, blocks)
        self.last_sigma = sigma.detach().to(self.last_sigma.dtype)
        scale = torch.clamp(sigma / self.max_norm, min=1.0)
        return weight / scale

    @torch.no_grad()
    def _top_eigenvalues(self, blocks: Tensor) -> Tensor:
        """``lambda_max(B(nu)^H B(nu))`` of every DFT block, (G, M_h, L_w): exact up to rounding
        (eigenvalues of the smaller Gram matrix, no vectors; a converged power iteration if LAPACK
        gives up on one)."""
        b = blocks  # (G, M_h, L_w, co_g, P), contiguous
        gram = b.mH @ b if b.shape[-1] <= b.shape[-2] else b @ b.mH
        try:
            return torch.linalg.eigvalsh(gram)[..., -1]
        except torch.linalg.LinAlgError:
            v = self._power(blocks, self._v_columns(blocks.real.dtype), 200)
            return (blocks @ v).abs().square().sum(dim=(-2, -1))

    @torch.no_grad()
    def _top_vector(self, blocks: Tensor, g: int, r: int, c: int) -> Tensor:
        """The top right singular vector of the one block ``(g, r, c)``."""
        block = blocks[g, r, c]  # (co_g, P)
        return torch.linalg.eigh(block.mH @ block)[1][:, -1]

    def _eval_forward(self, weight: Tensor) -> Tensor:
        w = weight.detach()
        state = self._eval_state
        same = (state is not None and state[0].shape == w.shape and state[0].dtype == w.dtype
                and state[0].device == w.device and torch.equal(state[0], w))
        record_grad = torch.is_grad_enabled() and weight.requires_grad
        if same and state[3] is not None and not record_grad:
            return state[3]
        if same:
            top, exact = state[1], state[2]
        else:
            with torch.no_grad():
                if bool(torch.isfinite(w).all()):
                    blocks = self._blocks(w)
                    lam = self._top_eigenvalues(blocks).clamp_min(0.0)
                    g, r, c = self._argmax_frequency(lam)
                    exact = (lam[g, r, c].sqrt() / math.sqrt(self.stride[0] * self.stride[1])).to(w.dtype)
                    top = (g, r, c, self._top_vector(blocks, g, r, c))
                else:  # a NaN or Inf weight: its capped weight is not finite either, and says so
                    exact, top = torch.full((), math.nan, dtype=w.dtype, device=w.device), None
        if record_grad and top is not None:
            # the value is the exact sigma, bit for bit as without grad; the gradient is that of the
            # top block's norm on its top singular vector (the derivative of the top singular value)
            block = self._block_sigma(weight, *top)
            sigma = exact + (block - block.detach())
        else:
            sigma = exact
        self.last_sigma = sigma.detach().to(self.last_sigma.dtype)
        out = weight / torch.clamp(sigma / self.max_norm, min=1.0)
        self._eval_state = (state[0] if same else w.clone(), top, exact, None if record_grad else out.detach())
        return out

    def extra_repr(self) -> str:
        return (
            f"max_norm={self.max_norm}, input_size={self.input_size}, grid_size={self.grid_size}, "
            f"stride={self.stride}, padding={self.padding}, n_power_iterations={self.n_power_iterations}"
        )


def find_operator_norm_cap(conv: nn.Module) -> OperatorNormCap | None:
    """The :class:`OperatorNormCap` registered on ``conv.weight``, or None."""
    if not parametrize.is_parametrized(conv, "weight"):
        return None
    for p in conv.parametrizations["weight"]:
        if isinstance(p, OperatorNormCap):
            return p
    return None


def apply_operator_norm_cap(
    conv: nn.Conv2d,
    max_norm: float,
    input_size: tuple[int, int],
    n_power_iterations: int = 1,
    *,
    generator: torch.Generator | None = None,
) -> nn.Conv2d:
    """Register an :class:`OperatorNormCap` on ``conv.weight`` (after existing parametrisations).

    The vectors are first set to the exact top singular vectors of the current effective weight's
    DFT blocks (:meth:`OperatorNormCap.warm_up`), so the cap is exact from the first forward.
    Returns ``conv``. Raises if a cap is already registered.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if find_operator_norm_cap(conv) is not None:
        raise ValueError("conv.weight already has an OperatorNormCap")
    cap = OperatorNormCap.from_conv(conv, max_norm, input_size, n_power_iterations, generator)
    with torch.no_grad():
        cap.warm_up(conv.weight.detach())
    parametrize.register_parametrization(conv, "weight", cap)
    return conv


def effective_weight(conv: nn.Module) -> Tensor:
    """The weight the forward uses (after weight norm and the cap), detached."""
    return conv.weight.detach()
