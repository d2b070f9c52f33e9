"""The Pattention score normalisation f(A), below both ``model/`` and ``tensor_parallel/`` (docs/design.md §1).

One implementation, parametrised by the reductions over the parameter-token dimension: the
single-device :class:`~megatron_tokenformer.model.pattention.Pattention` passes none (all n tokens are
local); :class:`~megatron_tokenformer.tensor_parallel.pattention.ParallelPattention` passes the
cross-rank all-reduces (each rank holds n/p tokens). Several score tensors can be normalised with one
batched reduction (the Q/K/V Pattentions of attention use one collective).

Statistics (norms, softmax max and sum) are computed in fp32 for fp32/bf16/fp16 inputs, with eps
under the square root so an all-zero row gives zeros, not NaN (float64 inputs stay float64). GeLU is
the exact (erf) one.

Two implementations of the same function:

- :func:`pattention_normalize_combine` (used by the models): O_i = f(A_i) V_i through ONE custom
  autograd function, :class:`PattentionNormCombine`, that saves for backward only the scores A (input
  dtype), the fp32 row statistics (r, or the softmax max and 1/sum) and the value tokens V, and
  recomputes the elementwise normalisation in backward (docs/design.md, "Memory-lean Pattention").
  The cross-rank reductions of the row statistics run inside it, forward and backward, as plain
  collectives passed in by the caller (ops/ does not import tensor_parallel).
- :func:`normalize_pattention_scores`: the plain autograd composition (autograd keeps the fp32 copy
  of A, A², the scaled scores and S). The reference the tests compare the function against, and the
  baseline of ``benchmarks/memory.py``; ``pattention_normalize_combine(..., lean=False)`` uses it.

The elementwise regions are separate functions (:func:`norm_forward_elementwise`,
:func:`norm_backward_local`, :func:`norm_backward_elementwise`) so a fused (compiled) variant can
replace them without touching the reductions.

Where the three backwards differ (all work in the compute dtype -- fp32, float64 for float64 inputs --
and compute dV = Sᵀ dO with S rounded to the input dtype, as in forward):

- the autograd composition (``lean=False``) differentiates through the ops it ran, in the compute dtype,
  from the fp32 copies autograd saved (A, A², the scaled scores, exp): nothing is recomputed.
- the plain lean kernels (:class:`ElementwiseKernels`) recompute S = f(A) in backward from the saved A
  (input dtype) and the fp32 statistics, then apply the closed-form derivative
  (:func:`norm_backward_elementwise`, docs/design.md §9) instead of autograd's chain of ops: the same
  function, rounded differently (within 1e-6 relative in fp32; with bf16 inputs both round A, S and dS
  to bf16 at the same places). Across the row-sum reduction they keep the fp32 partial result
  (dz, or dS with GeLU(A) and GeLU'(A), or dS with softmax(A)) and the upcast A.
- the fused kernels (:class:`FusedElementwiseKernels`) keep only dS in the input dtype across the
  reduction and recompute the fp32 partial result from A and dS in the second half: the same formulas
  on the same inputs in the same precision, so recomputation itself changes no value; what differs from
  the plain kernels is what Inductor generates (its erf/exp, fused multiply-adds, the order of the row
  sums): fp32 rounding differences only. At TP 1 both do the backward in one step per tensor.

``tests/unit/ops/test_pattention_norm.py`` and ``test_pattention_norm_fused.py`` bound all three against
each other and the formulas (fp32 1e-6 relative, bf16 2e-2, float64 gradcheck).
"""

from __future__ import annotations

import functools
import types
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_tokenformer.config import PATTENTION_NORMALIZATIONS as NORMALIZATIONS

Reduction = Optional[Callable[[torch.Tensor], torch.Tensor]]


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown Pattention normalization {normalization!r}; choose one of {NORMALIZATIONS}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics and elementwise math: fp32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _reduce_batched(stats: List[torch.Tensor], reduce: Reduction) -> List[torch.Tensor]:
    """Apply ``reduce`` once to all row statistics (concatenated), split the result back."""
    if reduce is None:
        return stats
    if len(stats) == 1:
        return [reduce(stats[0])]
    flat = reduce(torch.cat([s.reshape(-1) for s in stats]))
    out, offset = [], 0
    for s in stats:
        out.append(flat[offset:offset + s.numel()].view(s.shape))
        offset += s.numel()
    return out


def normalize_pattention_scores(scores: Sequence[torch.Tensor], normalization: str, taus: Sequence[float],
                                num_param_tokens: Sequence[int], eps: float = 1e-6,
                                sum_reduce: Reduction = None, max_reduce: Reduction = None) -> List[torch.Tensor]:
    """f(A) for one or several score tensors; returns tensors of the input dtype.

    scores: each [..., n_local] (this rank's parameter tokens, last dim).
    taus: tau per tensor (l2_norm_gelu, gelu_l2_norm). num_param_tokens: the GLOBAL n per tensor
    (the softmax is scaled by n).
    sum_reduce: sums a row statistic over the partitions of the token dimension (autograd-aware:
    its backward must also sum, e.g. ``all_reduce_norm``); None when all tokens are local.
    max_reduce: element-wise max over the partitions, without gradient (softmax only).
    Each reduction is called ONCE for all tensors together.

    - l2_norm_gelu:  GeLU(tau * A / sqrt(sum_j A_j^2 + eps))
    - gelu_l2_norm:  tau * G / sqrt(sum_j G_j^2 + eps),  G = GeLU(A)
    - softmax:       n * exp(A - m) / sum_j exp(A_j - m),  m = max_j A_j (no gradient through m)
    """
    check_normalization(normalization)
    dtypes = [s.dtype for s in scores]
    a32 = [s.to(compute_dtype(s.dtype)) for s in scores]
    if normalization == "l2_norm_gelu":
        sq = _reduce_batched([(a * a).sum(dim=-1) for a in a32], sum_reduce)
        out = [F.gelu(a * (tau * torch.rsqrt(q + eps)).unsqueeze(-1)) for a, q, tau in zip(a32, sq, taus)]
    elif normalization == "gelu_l2_norm":
        g32 = [F.gelu(a) for a in a32]
        sq = _reduce_batched([(g * g).sum(dim=-1) for g in g32], sum_reduce)
        out = [g * (tau * torch.rsqrt(q + eps)).unsqueeze(-1) for g, q, tau in zip(g32, sq, taus)]
    else:
        with torch.no_grad():
            maxes = _reduce_batched([a.detach().amax(dim=-1) for a in a32], max_reduce)
        exps = [torch.exp(a - m.unsqueeze(-1)) for a, m in zip(a32, maxes)]
        sums = _reduce_batched([e.sum(dim=-1) for e in exps], sum_reduce)
        out = [e * (float(n) / z).unsqueeze(-1) for e, z, n in zip(exps, sums, num_param_tokens)]
    return [o.to(dt) for o, dt in zip(out, dtypes)]


# --- memory-lean path: one autograd function, elementwise recomputation in backward ---------------
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def norm_row_statistic(a: torch.Tensor, normalization: str, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's part of the row statistic that is summed over all n tokens (before the reduction).

    a: [..., n_local] in the compute dtype -> [...]. l2_norm_gelu: Σ a²; gelu_l2_norm: Σ GeLU(a)²;
    softmax: Σ exp(a - shift) (shift = the all-reduced row max, [...]).
    """
    if normalization == "l2_norm_gelu":
        return torch.linalg.vecdot(a, a)
    if normalization == "gelu_l2_norm":
        g = F.gelu(a)
        return torch.linalg.vecdot(g, g)
    return torch.exp(a - shift.unsqueeze(-1)).sum(dim=-1)


def norm_forward_elementwise(a: torch.Tensor, stats: Sequence[torch.Tensor], normalization: str, tau: float,
                             n: int) -> torch.Tensor:
    """S = f(A) from A and its reduced row statistics, elementwise.

    a: [..., n_local] (compute dtype). stats: (r,) with r = (Σ a² + eps)^-1/2 resp. (Σ GeLU(a)² + eps)^-1/2,
    or (m, 1/Σ exp(a - m)) for softmax, each [...] in the compute dtype. Returns S [..., n_local].
    """
    if normalization == "l2_norm_gelu":
        return F.gelu(a * (tau * stats[0]).unsqueeze(-1))
    if normalization == "gelu_l2_norm":
        return F.gelu(a) * (tau * stats[0]).unsqueeze(-1)
    m, inv_sum = stats
    return torch.exp(a - m.unsqueeze(-1)) * (float(n) * inv_sum).unsqueeze(-1)


def norm_backward_local(a: torch.Tensor, stats: Sequence[torch.Tensor], grad_s: torch.Tensor, normalization: str,
                        tau: float, n: int):
    """The elementwise backward before the reduction, in one pass over A (one erf, one exp).

    a, grad_s: [..., n_local] (compute dtype); grad_s may be overwritten.
    Returns ``(S, row_dot, partial)``: S = f(A) recomputed (for
    dV = Sᵀ dO), this rank's part of the one row sum backward needs ([...]; summed over all n tokens by
    the caller), and what :func:`norm_backward_elementwise` needs after the reduction:

    - l2_norm_gelu:  z = τ a r; row_dot = Σ dz ⊙ a with dz = dS ⊙ GeLU'(z); partial = dz
    - gelu_l2_norm:  g = GeLU(a); row_dot = Σ dS ⊙ g; partial = (dS, g, GeLU'(a))
    - softmax:       s = softmax(a); row_dot = Σ dS ⊙ s; partial = (dS, s)
    """
    if normalization == "l2_norm_gelu":  # in place where the temporaries are ours (fewer T x n allocations)
        z = a * (tau * stats[0]).unsqueeze(-1)
        cdf = torch.mul(z, _INV_SQRT_2).erf_().add_(1.0).mul_(0.5)
        s = z * cdf
        gelu_grad = torch.mul(z, z).mul_(-0.5).exp_().mul_(z).mul_(_INV_SQRT_2PI).add_(cdf)
        del z, cdf
        dz = grad_s.mul_(gelu_grad)
        return s, torch.linalg.vecdot(dz, a), dz
    if normalization == "gelu_l2_norm":
        cdf = 0.5 * (1.0 + torch.erf(a * _INV_SQRT_2))
        g = a * cdf
        gelu_grad = cdf + a * torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
        return g * (tau * stats[0]).unsqueeze(-1), (grad_s * g).sum(dim=-1), (grad_s, g, gelu_grad)
    m, inv_sum = stats
    prob = torch.exp(a - m.unsqueeze(-1)) * inv_sum.unsqueeze(-1)
    return float(n) * prob, (grad_s * prob).sum(dim=-1), (grad_s, prob)


def norm_backward_elementwise(a: torch.Tensor, stats: Sequence[torch.Tensor], partial, row_dot: torch.Tensor,
                              normalization: str, tau: float, n: int) -> torch.Tensor:
    """dA from the output of :func:`norm_backward_local` (may be overwritten) and the reduced row sum
    (docs/design.md §9):

    - l2_norm_gelu:  dA = τ r dz − τ r³ a Σ(dz ⊙ a)
    - gelu_l2_norm:  dA = (τ r dS − τ r³ g Σ(dS ⊙ g)) ⊙ GeLU'(a)
    - softmax:       dA = n s ⊙ (dS − Σ(dS ⊙ s))
    """
    if normalization == "l2_norm_gelu":
        r = stats[0].unsqueeze(-1)
        return partial.mul_(tau * r).addcmul_(a, (tau * r * r * r) * row_dot.unsqueeze(-1), value=-1.0)
    if normalization == "gelu_l2_norm":
        grad_s, g, gelu_grad = partial
        r = stats[0].unsqueeze(-1)
        return ((tau * r) * grad_s - (tau * r * r * r) * g * row_dot.unsqueeze(-1)) * gelu_grad
    grad_s, prob = partial
    return (float(n) * prob) * (grad_s - row_dot.unsqueeze(-1))


# The elementwise steps, each over one score tensor flattened to rows [rows, n_local] in its INPUT dtype
# (upcast inside). Plain kernels call them; the fused kernels compile each into one kernel.
def _row_max(a_in, *, normalization: str):
    return a_in.to(compute_dtype(a_in.dtype)).amax(dim=-1)


def _row_statistic(a_in, shift, *, normalization: str):
    return norm_row_statistic(a_in.to(compute_dtype(a_in.dtype)), normalization, shift)


def _forward(a_in, stats, *, normalization: str, tau, n):
    a = a_in.to(compute_dtype(a_in.dtype))
    return norm_forward_elementwise(a, stats, normalization, tau, n).to(a_in.dtype)


def _forward_local(a_in, eps, *, normalization: str, tau, n):
    kernels = ElementwiseKernels(normalization)
    stats = _reduced_statistics([a_in], kernels, eps, None, None)[0]
    return _forward(a_in, stats, normalization=normalization, tau=tau, n=n), stats


def _backward_local_recompute(a_in, stats, grad_s, *, normalization: str, tau, n):
    """(S, row sum) from A and dS; the partial result is recomputed by :func:`_backward_finish_recompute`."""
    a = a_in.to(compute_dtype(a_in.dtype))
    s, row_dot, _ = norm_backward_local(a, stats, grad_s.to(a.dtype).clone(), normalization, tau, n)
    return s.to(a_in.dtype), row_dot


def _backward_finish_recompute(a_in, stats, grad_s, row_dot, *, normalization: str, tau, n):
    a = a_in.to(compute_dtype(a_in.dtype))
    _, _, partial = norm_backward_local(a, stats, grad_s.to(a.dtype).clone(), normalization, tau, n)
    return norm_backward_elementwise(a, stats, partial, row_dot, normalization, tau, n).to(a_in.dtype)


def _backward_whole(a_in, stats, grad_s, *, normalization: str, tau, n):
    a = a_in.to(compute_dtype(a_in.dtype))
    s, row_dot, partial = norm_backward_local(a, stats, grad_s.to(a.dtype).clone(), normalization, tau, n)
    return s.to(a_in.dtype), norm_backward_elementwise(a, stats, partial, row_dot, normalization, tau, n).to(a_in.dtype)


_COMPILED = {}


def _compiled(fn, normalization: str):
    """``torch.compile`` of one elementwise step for one normalisation, once per process.

    Shapes are dynamic (every layer, micro-batch and sequence length shares the kernels; tau and n are
    arguments, not constants). Dynamo keeps its compiled variants (and its recompile limit) per code
    object, so each normalisation gets its own copy of the step's code object: the variants of one
    normalisation (dtypes, size-1 specialisations) do not crowd out another's.
    """
    key = (fn, normalization)
    if key not in _COMPILED:
        name = f"{fn.__name__}_{normalization}"
        code = _renamed_code(fn.__code__, name)
        step = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        step.__kwdefaults__ = {"normalization": normalization}
        _COMPILED[key] = torch.compile(step, dynamic=True, fullgraph=True)
    return _COMPILED[key]


def _renamed_code(code, name: str):
    """A copy of ``code`` named ``name`` (``co_qualname`` too where it exists: Python >= 3.11)."""
    if hasattr(code, "co_qualname"):
        return code.replace(co_name=name, co_qualname=name)
    return code.replace(co_name=name)


def _rows(t):
    return t.reshape(-1, t.shape[-1])


def _flat(stats):
    return tuple(t.reshape(-1) for t in stats)


class ElementwiseKernels:
    """The elementwise steps of the lean function over one score tensor in its INPUT dtype (upcast inside):
    the row statistics, f(A) and the two backward halves around the row-sum reduction.

    - ``row_max(a_in)`` -> [...]; ``row_statistic(a_in, shift)`` -> [...]: before the reductions.
    - ``forward(a_in, stats, tau, n)`` -> S [..., n_local] in the input dtype.
    - ``backward_local(a_in, stats, grad_s, tau, n)`` -> (S, row_dot, state).
    - ``backward_finish(a_in, stats, state, row_dot, tau, n)`` -> dA in the input dtype.

    When all n tokens are local (no reductions) the steps around each reduction meet:
    ``forward_local(a_in, eps, tau, n)`` -> (S, stats) and ``backward_whole(a_in, stats, grad_s, tau, n)``
    -> (S, dA).

    These plain kernels run the steps eagerly and keep the backward's fp32 partial result between its
    halves; :class:`FusedElementwiseKernels` compiles the same steps.
    """

    fused = False

    def __init__(self, normalization: str):
        self.normalization = normalization

    def _step(self, fn):
        return functools.partial(fn, normalization=self.normalization)

    def row_max(self, a_in):
        return self._step(_row_max)(_rows(a_in)).view(a_in.shape[:-1])

    def row_statistic(self, a_in, shift=None):
        shift = None if shift is None else shift.reshape(-1)
        return self._step(_row_statistic)(_rows(a_in), shift).view(a_in.shape[:-1])

    def forward(self, a_in, stats, tau, n):
        return self._step(_forward)(_rows(a_in), _flat(stats), tau=tau, n=n).view(a_in.shape)

    def forward_local(self, a_in, eps, tau, n):
        s, stats = self._step(_forward_local)(_rows(a_in), eps, tau=tau, n=n)
        return s.view(a_in.shape), tuple(t.view(a_in.shape[:-1]) for t in stats)

    def backward_local(self, a_in, stats, grad_s, tau, n):
        a = a_in.to(compute_dtype(a_in.dtype))
        s, row_dot, partial = norm_backward_local(a, stats, grad_s.to(a.dtype), self.normalization, tau, n)
        return s.to(a_in.dtype), row_dot, (a, partial)

    def backward_finish(self, a_in, stats, state, row_dot, tau, n):
        a, partial = state
        return norm_backward_elementwise(a, stats, partial, row_dot, self.normalization, tau, n).to(a_in.dtype)

    def backward_whole(self, a_in, stats, grad_s, tau, n):
        s, row_dot, state = self.backward_local(a_in, stats, grad_s, tau, n)
        return s, self.backward_finish(a_in, stats, state, row_dot, tau, n)


class FusedElementwiseKernels(ElementwiseKernels):
    """The same steps, each compiled into one kernel (``--fused-pattention-norm``).

    The backward keeps dS (input dtype) between its halves instead of the fp32 partial result, and the
    second half recomputes the elementwise terms: one more pass over A, no fp32 T x n temporaries. At
    TP 1 each of forward and backward is one kernel (a row reduction and its consumer).
    """

    fused = True

    def _step(self, fn):
        return _compiled(fn, self.normalization)

    def backward_local(self, a_in, stats, grad_s, tau, n):
        s, row_dot = self._step(_backward_local_recompute)(_rows(a_in), _flat(stats), _rows(grad_s), tau=tau, n=n)
        return s.view(a_in.shape), row_dot.view(a_in.shape[:-1]), grad_s

    def backward_finish(self, a_in, stats, state, row_dot, tau, n):
        grad = self._step(_backward_finish_recompute)(_rows(a_in), _flat(stats), _rows(state), row_dot.reshape(-1),
                                                      tau=tau, n=n)
        return grad.view(a_in.shape)

    def backward_whole(self, a_in, stats, grad_s, tau, n):
        s, grad = self._step(_backward_whole)(_rows(a_in), _flat(stats), _rows(grad_s), tau=tau, n=n)
        return s.view(a_in.shape), grad.view(a_in.shape)


def probe_fused_kernels(device, compile_fn: Optional[Callable] = None) -> Optional[str]:
    """Compile and run one tiny elementwise kernel with ``torch.compile`` on ``device`` (a torch.device),
    as the fused kernels will. Returns None when it works, else one line saying why not.

    ``find_spec("triton")`` is not enough on CUDA: Triton builds a C launcher for each kernel at run time
    (it needs a C compiler and Python.h), so an installed Triton can still fail at the first forward.
    """
    try:
        x = torch.linspace(-2.0, 2.0, 16, device=device)
        compile_fn = torch.compile if compile_fn is None else compile_fn  # (tests inject a failing one)
        step = compile_fn(lambda t: F.gelu(t) * t.square(), dynamic=False, fullgraph=True)
        got = step(x)
        want = F.gelu(x) * x.square()
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return "the compiled probe kernel computed a wrong result"
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of the toolchain means: use the plain kernels
        text = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


@functools.lru_cache(maxsize=None)
def elementwise_kernels(normalization: str, fused: bool = False) -> ElementwiseKernels:
    """The kernels of one variant, built once per process and shared by every call (they hold no
    per-call state; the compiled steps are cached in :data:`_COMPILED`)."""
    check_normalization(normalization)
    return FusedElementwiseKernels(normalization) if fused else ElementwiseKernels(normalization)


def _reduced_statistics(scores: Sequence[torch.Tensor], kernels: ElementwiseKernels, eps: float,
                        sum_reduce: Reduction, max_reduce: Reduction) -> List[Tuple[torch.Tensor, ...]]:
    """Row statistics of every score tensor, reduced over the token partitions (one collective per kind)."""
    if kernels.normalization == "softmax":
        maxes = _reduce_batched([kernels.row_max(a) for a in scores], max_reduce)
        sums = _reduce_batched([kernels.row_statistic(a, m) for a, m in zip(scores, maxes)], sum_reduce)
        return [(m, 1.0 / z) for m, z in zip(maxes, sums)]
    sq = _reduce_batched([kernels.row_statistic(a) for a in scores], sum_reduce)
    return [(torch.rsqrt(q + eps),) for q in sq]


#: The non-tensor arguments of :meth:`PattentionNormCombine.forward`, in order, before the k scores and
#: k value tensors: ``needs_input_grad[NUM_NON_TENSOR_ARGS + i]`` is A_i's, ``[NUM_NON_TENSOR_ARGS + k + i]``
#: V_i's, and backward returns one None for each of them first.
NON_TENSOR_ARGS = ("kernels", "taus", "ns", "eps", "sum_reduce", "max_reduce", "k")
NUM_NON_TENSOR_ARGS = len(NON_TENSOR_ARGS)


class PattentionNormCombine(torch.autograd.Function):
    """O_i = f(A_i) V_i for k Pattentions sharing one normalisation, saving only A_i, the row statistics and V_i.

    forward(ctx, kernels, taus, ns, eps, sum_reduce, max_reduce, k, A_1..A_k, V_1..V_k) (the
    :data:`NON_TENSOR_ARGS`, then the tensors):
    kernels: the :class:`ElementwiseKernels` of the normalisation (plain or fused);
    A_i [..., n_i_local] scores, V_i [n_i_local, d_i] value tokens (same dtype as A_i) ->
    O_i [..., d_i] (partial sums over this rank's tokens when the tokens are partitioned).
    sum_reduce / max_reduce: plain (non-autograd) sum / max over the token partitions, or None.
    Forward: 1 max reduction (softmax) + 1 sum reduction; backward: 1 sum reduction (all k batched).
    """

    @staticmethod
    def forward(ctx, kernels, taus, ns, eps, sum_reduce, max_reduce, k, *tensors):
        scores, values = tensors[:k], tensors[k:]
        if sum_reduce is None and max_reduce is None:  # all tokens local: statistics and S in one step
            weights, stats = zip(*[kernels.forward_local(a_in, eps, tau, n) for a_in, tau, n in zip(scores, taus, ns)])
        else:
            stats = _reduced_statistics(scores, kernels, eps, sum_reduce, max_reduce)
            weights = [kernels.forward(a_in, st, tau, n) for a_in, st, tau, n in zip(scores, stats, taus, ns)]
        outs = [torch.matmul(s, v) for s, v in zip(weights, values)]
        del weights
        ctx.kernels, ctx.taus, ctx.ns, ctx.k, ctx.sum_reduce = kernels, taus, ns, k, sum_reduce
        ctx.num_stats = len(stats[0])
        ctx.save_for_backward(*scores, *values, *[t for st in stats for t in st])
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs):
        k, kernels = ctx.k, ctx.kernels
        saved = ctx.saved_tensors
        scores, values, flat_stats = saved[:k], saved[k:2 * k], saved[2 * k:]
        stats = [tuple(flat_stats[i * ctx.num_stats:(i + 1) * ctx.num_stats]) for i in range(k)]
        grad_values, states, row_dots, grad_scores = [], [], [], []
        whole = ctx.sum_reduce is None  # all tokens local: the backward in one step per tensor
        for i, (a_in, v, st, g, tau, n) in enumerate(zip(scores, values, stats, grad_outs, ctx.taus, ctx.ns)):
            if g is None:
                g = torch.zeros(a_in.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
            if whole:
                s, grad = kernels.backward_whole(a_in, st, torch.matmul(g, v.t()), tau, n)
                grad_scores.append(grad)
            else:
                s, row_dot, state = kernels.backward_local(a_in, st, torch.matmul(g, v.t()), tau, n)
                row_dots.append(row_dot)
                states.append(state)
            if ctx.needs_input_grad[NUM_NON_TENSOR_ARGS + k + i]:
                grad_values.append(s.reshape(-1, s.shape[-1]).t().matmul(g.reshape(-1, g.shape[-1])))
            else:
                grad_values.append(None)
            del s
        if not whole:
            row_dots = _reduce_batched(row_dots, ctx.sum_reduce)
            grad_scores = [kernels.backward_finish(a_in, st, state, rd, tau, n)
                           for a_in, st, state, rd, tau, n in zip(scores, stats, states, row_dots, ctx.taus, ctx.ns)]
        return (None,) * NUM_NON_TENSOR_ARGS + tuple(grad_scores) + tuple(grad_values)


def pattention_normalize_combine(scores: Sequence[torch.Tensor], values: Sequence[torch.Tensor], normalization: str,
                                 taus: Sequence[float], num_param_tokens: Sequence[int], eps: float = 1e-6,
                                 sum_reduce: Reduction = None, max_reduce: Reduction = None,
                                 lean: bool = True, fused: bool = False) -> List[torch.Tensor]:
    """O_i = f(A_i) V_i for one or several Pattentions; each reduction runs once for all of them.

    scores: A_i [..., n_i_local]; values: V_i [n_i_local, d_i]; returns O_i [..., d_i] in A_i's dtype.
    taus, num_param_tokens (GLOBAL n), eps: as :func:`normalize_pattention_scores`.
    sum_reduce / max_reduce: PLAIN (non-autograd) sum / max of a row statistic over the token partitions
    (None when all tokens are local); the backward's sum reduction uses sum_reduce too.
    lean=False: the autograd composition (:func:`normalize_pattention_scores`, then S V) instead; its
    sum reduction must then be autograd-aware, so it is wrapped here as sum forward AND backward.
    fused=True: the elementwise steps compiled (:class:`FusedElementwiseKernels`; lean only).
    """
    check_normalization(normalization)
    if len(scores) != len(values):
        raise ValueError(f"pattention_normalize_combine: {len(scores)} score tensors but {len(values)} value tensors")
    if not lean:
        if fused:
            raise ValueError("pattention_normalize_combine: fused=True needs the memory-lean function (lean=True)")
        autograd_sum = None if sum_reduce is None else _autograd_sum(sum_reduce)
        weights = normalize_pattention_scores(scores, normalization, taus, num_param_tokens, eps,
                                              sum_reduce=autograd_sum, max_reduce=max_reduce)
        return [torch.matmul(w, v) for w, v in zip(weights, values)]
    return list(PattentionNormCombine.apply(elementwise_kernels(normalization, fused),
                                            tuple(float(t) for t in taus),
                                            tuple(int(n) for n in num_param_tokens), float(eps), sum_reduce,
                                            max_reduce, len(scores), *scores, *values))


class _SumOverPartitions(torch.autograd.Function):
    """An autograd-aware sum over the token partitions from a plain one: ``reduce`` forward, ``reduce``
    of the gradient backward (the gradient of a sum over ranks is the sum of the ranks' gradients)."""

    @staticmethod
    def forward(ctx, reduce, x):
        ctx.reduce = reduce
        return reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.reduce(grad)


def _autograd_sum(reduce: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``reduce`` (a plain sum over partitions) as an autograd-aware one (:class:`_SumOverPartitions`)."""
    return functools.partial(_SumOverPartitions.apply, reduce)
