"""``torch.compile`` for the DEQ map f: compiled once per run, not once per step or solver iteration.

What is compiled is one application of the layer on the flat state, ``unpack -> layer -> pack``
(:func:`layer_step`), with the layer and the input injection as arguments. Everything that changes
from step to step enters as a tensor (the weights that ``parametrize.cached`` materialised for the
forward, the dropout masks, the injection), so dynamo guards only on their shapes, dtypes and
strides, and a run compiles one graph per combination of: training or eval mode, grad enabled or
not (the forward solve runs without a graph, the IFT re-evaluation with one), autocast state and
batch size (``dynamic=False``: static shapes, which CUDA graphs need and inductor specialises
convolutions on). The caps' power iteration and FFT norms stay outside, in the cached weights; the
Jacobian penalty differentiates twice, which AOTAutograd does not support, so it runs eagerly.

With a CUDA-graph mode (``"reduce-overhead"``, ``"max-autotune"``) only the calls without grad
(the forward solve and evaluation, where the solver loop launches f up to ``f_thres`` times) use
CUDA graphs; the IFT re-evaluation, whose graph the adjoint solve differentiates many times, is
compiled in the same mode without CUDA graphs. CUDA-graph outputs live in buffers that the next
replay overwrites, so they are cloned before the solver keeps them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lipdeq.errors import LipdeqError

if TYPE_CHECKING:
    from lipdeq.models.layer import MultiscaleLayer

__all__ = ["COMPILE_MODES", "CompiledStep", "layer_step"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDAGRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


class CompileModeError(LipdeqError, ValueError):
    """An unknown ``torch.compile`` mode was requested."""


def layer_step(layer: MultiscaleLayer, z: torch.Tensor, u: torch.Tensor, zero_state: bool = False) -> torch.Tensor:
    """One application of f on the flat ``(B, D)`` state, in ``z``'s dtype (under autocast the layer
    computes in low precision; the state stays in the solver's dtype). ``zero_state``: ``z`` is known to
    be exactly zero (see :meth:`MultiscaleLayer.forward`)."""
    return layer.pack(layer(layer.unpack(z), u, zero_state=zero_state)).to(z.dtype)


class CompiledStep:
    """:func:`layer_step` under ``torch.compile`` (see the module docstring for what compiles when).

    Each instance has its own compile cache (``isolate_recompiles``), so several models compiled
    in one process (a benchmark sweep) do not count against one another's recompilation limit.
    """

    def __init__(self, mode: str = "default", backend: str = "inductor") -> None:
        if mode not in COMPILE_MODES:
            raise CompileModeError(f"unknown compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self.mode, self.backend = mode, backend
        self.cudagraphs = mode in _CUDAGRAPH_MODES
        self._nograd = self._compile(mode)
        self._grad = self._compile(_CUDAGRAPH_MODES[mode]) if self.cudagraphs else self._nograd

    def _compile(self, mode: str):
        # mode is an inductor option; other backends (the tests' "eager", "aot_eager") take none
        return torch.compile(layer_step, fullgraph=True, dynamic=False, backend=self.backend,
                             mode=mode if self.backend == "inductor" else None, isolate_recompiles=True)

    def __call__(self, layer: MultiscaleLayer, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._grad(layer, z, u)
        if not self.cudagraphs:
            return self._nograd(layer, z, u)
        torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs may be overwritten
        return self._nograd(layer, z, u).clone()

    def __repr__(self) -> str:
        return f"CompiledStep(mode={self.mode!r}, backend={self.backend!r})"
