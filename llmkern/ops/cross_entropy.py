"""Fused cross-entropy over logits: public API, validation, registration, dispatch, autograd.

    cross_entropy(logits, labels, *, ignore_index=-100, reduction="mean", softcap=None, label_smoothing=0.0)
      == F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=..., reduction=...,
                         label_smoothing=...)

plus, with z_loss > 0, the z-loss of PaLM / Liger-Kernel: z_loss * logsumexp(z)^2 per row not ignored, reduced
as the loss is (return_z_loss=True returns it beside the loss, for logging).

Kernels: llmkern/kernels/cross_entropy.py (forward: one read of the logits, online logsumexp;
backward: one read and one write, softmax recomputed from the saved logsumexp); reference:
llmkern/reference/cross_entropy.py. The Triton path runs inside the torch.library custom ops
`llmkern::cross_entropy_fwd` / `llmkern::cross_entropy_bwd` (autograd registered on the forward),
so the op traces under torch.compile(fullgraph=True) as one opaque node and passes `opcheck`.

Dispatch: CUDA tensors run the Triton kernels (float32, float16, bfloat16). CPU tensors run the
reference unless LLMKERN_BACKEND=triton, which runs the same kernels under TRITON_INTERPRET=1
(float32/float16; the interpreter has no bfloat16). float64 always uses the reference, as do calls under
torch.func transforms (grad, jacrev, vmap: a custom op's autograd does not run there).

Memory traffic per logit: eager ``F.cross_entropy(logits.float(), labels)`` on bf16 logits moves
about 36 bytes (upcast copy, log_softmax output, their backward, the cast back); this op reads the
logits once in the forward, once more in the backward and writes the gradient once: 6 bytes for
bf16. It saves the logits (not a float32 copy) and a float32 logsumexp per row for the backward.
"""
import contextlib
import functools
import math
import numbers
from typing import Optional, Tuple

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.reference import cross_entropy as ref

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_LABEL_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")


# ---- dispatch -----------------------------------------------------------------------------------

def _backend_for(device, dtype=torch.float32, op_name="cross_entropy"):
    return _backend.choose_triton(op_name, device, dtype, _KERNEL_DTYPES)


_backend.register_op("cross_entropy", lambda device, dtype: _backend_for(device, dtype))


# ---- validation ---------------------------------------------------------------------------------

_tensor = _checks.tensor_arg


_softcap = _checks.softcap_arg


def _check(logits, labels, ignore_index, reduction):
    """The argument checks; returns _check_labels's deferred message (or None)."""
    _tensor("logits", logits)
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be float32, float16 or bfloat16 (float64: reference only), "
                         f"got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [N, V] or [..., V] with V >= 1, got {tuple(logits.shape)}")
    deferred = _check_labels(labels, tuple(logits.shape[:-1]), logits.shape[-1], logits.device, ignore_index,
                             "logits.shape[:-1]", "logits")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return deferred


def _label_smoothing_arg(label_smoothing):
    """label_smoothing as a float in [0, 1] (torch's range), or an error naming it."""
    eps = _checks.real_arg("label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1] (0: none), got {label_smoothing}")
    return eps


def _z_loss_arg(z_loss):
    """z_loss as a float >= 0 (the coefficient of logsumexp^2), or an error naming it."""
    lam = _checks.real_arg("z_loss", z_loss, float32=True)
    if lam < 0:
        raise ValueError(f"z_loss must be >= 0 (the coefficient of logsumexp(logits)^2; 0: none), got {z_loss}")
    return lam


def _loss_terms(label_smoothing, z_loss, return_z_loss):
    """(label_smoothing, z_loss, return_z_loss) checked, for the three losses."""
    return (_label_smoothing_arg(label_smoothing), _z_loss_arg(z_loss),
            _checks.bool_arg("return_z_loss", return_z_loss))


def ignored(labels, ignore_index):
    """labels == ignore_index, compared as int64 (as the kernels and the reference do): for int32 labels torch
    casts the int to int32, so an ignore_index beyond int32 (2**40) wrapped and matched labels (0)."""
    if labels.dtype == torch.int32 and not -(2**31) <= ignore_index < 2**31:
        return torch.zeros_like(labels, dtype=torch.bool)
    return labels == ignore_index


def _check_labels(labels, lead, V, device, ignore_index, lead_name, device_name):
    """Checks the labels' type, shape and device, and on CPU in eager mode their values (ValueError). Returns
    the message of the value check left to the caller (None: none), where the values cannot be read: CUDA (a
    read is a host sync), torch.compile and CUDA graph capture (no read at all); the caller runs it as an
    assert_async (_assert_labels, or on the count of the kernels, which treat such a row as ignored: a silently
    wrong loss unchecked), a device-side assert on CUDA as F.cross_entropy's."""
    _tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an int64 or int32 tensor of class indices (class probabilities "
                         f"are not supported), got {labels.dtype}")
    if labels.dtype not in _LABEL_DTYPES:
        raise ValueError(f"labels must be an int64 or int32 tensor of class indices, got {labels.dtype}")
    N = math.prod(lead)
    if tuple(labels.shape) != lead and not (labels.dim() == 1 and labels.shape[0] == N):
        raise ValueError(f"labels must have shape {list(lead)} ({lead_name}) or [{N}], "
                         f"got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but {device_name} is on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= int(ignore_index) < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    # (not inside _checks.trusted(); nor under torch.func, where vmap's batched labels have no values to read: bool()
    # raised vmap's "data-dependent control flow" error, where F.cross_entropy runs)
    if N == 0 or _checks.values_trusted() or _checks._functorch_active():
        return None
    message = f"labels must be in [0, {V}) or equal ignore_index ({ignore_index})"
    if labels.device.type == "cpu" and _checks.checking_values():
        if _checks.has_values(labels):
            bad = _out_of_range(labels, V, ignore_index)
            if bool(bad.any()):
                raise ValueError(f"{message}, got {int(labels[bad].reshape(-1)[0])}")
        return None
    if torch.compiler.is_compiling() or _checks.has_values(labels):
        return message
    return None


def _assert_labels(labels, V, ignore_index, message):
    """The deferred value check of the reference path (nine launches on CUDA; the kernels' paths assert on the
    forward kernel's count instead: three, its zeros, the == 0 and the assert)."""
    _checks.assert_async(~_out_of_range(labels, V, ignore_index).any(), message)


def _out_of_range(labels, V, ignore_index):
    return ~ignored(labels, ignore_index) & ((labels < 0) | (labels >= V))


def _rows_collapse(shape, stride):
    """Whether leading dims with these sizes/strides flatten into one strided row dimension."""
    dims = [(n, s) for n, s in zip(shape, stride) if n != 1]
    return all(s0 == s1 * n1 for (_, s0), (n1, s1) in zip(dims, dims[1:]))


def _flat_logits(logits):
    """[N, V] view, or [B, T, V] when only two strided row dims express the rows (the kernels take
    both without a copy, e.g. logits[:, :-1]); anything else is made contiguous."""
    V = logits.shape[-1]
    if logits.stride(-1) != 1 and V != 1:
        logits = logits.contiguous()
    if logits.dim() == 2:
        return logits
    if _rows_collapse(logits.shape[:-1], logits.stride()[:-1]):
        return logits.reshape(-1, V)  # a view
    if logits.dim() == 3:
        return logits
    return logits.reshape(-1, V)  # copies


# ---- torch.library ops (the Triton path) --------------------------------------------------------

def _kern():
    from llmkern.kernels import cross_entropy as kern

    return kern


def _n_valid(labels, V, ignore_index):
    """Non-ignored rows as an int64 0-dim device tensor (out-of-range labels are ignored)."""
    return (~ignored(labels, ignore_index) & (labels >= 0) & (labels < V)).sum()


def _reduce(loss, n_valid, reduction):
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / n_valid
    return loss


@torch.library.custom_op("llmkern::cross_entropy_fwd", mutates_args=())
def _ce_fwd_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float,
               reduction: str, label_smoothing: float = 0.0,
               z_loss: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] or [B, T, V]; labels [N]. Returns (loss: float32 0-dim, or [N] for "none", the z-loss
    included; lse float32 [N, 2]: the log-sum-exp and its rounding error, 0 at ignored rows; n_valid int64
    0-dim; bad int32 0-dim: the rows whose label is neither in [0, V) nor ignore_index, for the caller's
    assert)."""
    return _fwd_impl(logits, labels, ignore_index, softcap, reduction, label_smoothing, z_loss)


def _z_rows(lse, z_loss):
    """z_loss * lse^2 per row from the kernels' logsumexp pair (0 at ignored rows, where it is 0); zeros without
    z_loss (0 * lse^2 would be NaN where lse^2 overflows)."""
    if not z_loss:
        return lse.new_zeros(lse.shape[0])
    return z_loss * lse[:, 0].square()


def _fwd_impl(logits, labels, ignore_index, softcap, reduction, label_smoothing=0.0, z_loss=0.0):
    loss, lse, bad = _kern().cross_entropy_forward(logits, labels, ignore_index=ignore_index, softcap=softcap,
                                                   label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + _z_rows(lse, z_loss)
    n_valid = _n_valid(labels, logits.shape[-1], ignore_index)
    return _reduce(loss, n_valid, reduction), lse, n_valid, bad


@_ce_fwd_op.register_fake
def _(logits, labels, ignore_index, softcap, reduction, label_smoothing=0.0, z_loss=0.0):
    N = labels.shape[0]
    out = logits.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    return (out, logits.new_empty((N, 2), dtype=torch.float32), labels.new_empty((), dtype=torch.int64),
            labels.new_empty((), dtype=torch.int32))


@torch.library.custom_op("llmkern::cross_entropy_bwd", mutates_args=())
def _ce_bwd_op(dout: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
               n_valid: torch.Tensor, ignore_index: int, softcap: float, reduction: str,
               label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    return _bwd_impl(dout, logits, labels, lse, n_valid, ignore_index, softcap, reduction, label_smoothing, z_loss)


def _bwd_impl(dout, logits, labels, lse, n_valid, ignore_index, softcap, reduction, label_smoothing=0.0,
              z_loss=0.0):
    return _kern().cross_entropy_backward(dout, logits, labels, lse, n_valid, ignore_index=ignore_index,
                                          softcap=softcap, mean=reduction == "mean",
                                          label_smoothing=label_smoothing, z_loss=z_loss)


@_ce_bwd_op.register_fake
def _(dout, logits, labels, lse, n_valid, ignore_index, softcap, reduction, label_smoothing=0.0, z_loss=0.0):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels = inputs[:2]
    _, lse, n_valid, bad = output
    ctx.save_for_backward(logits, labels, lse, n_valid)
    ctx.args = tuple(inputs[2:])  # ignore_index, softcap, reduction[, label_smoothing, z_loss]
    ctx.mark_non_differentiable(lse, n_valid, bad)


def _backward(ctx, dout, _dlse, _dn, _dbad, bwd=None):
    logits, labels, lse, n_valid = ctx.saved_tensors
    dlogits = (bwd or _ce_bwd_op)(dout, logits, labels, lse, n_valid, *ctx.args)
    return (dlogits,) + (None,) * (1 + len(ctx.args))


_ce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_CrossEntropyFunction = _checks.eager_twin("_CrossEntropyFunction", _fwd_impl, _setup_context,
                                           functools.partial(_backward, bwd=_bwd_impl),
                                           "The eager twin of llmkern::cross_entropy_fwd / _bwd.")


def _ce_fwd(logits, labels, *args):
    """(loss, lse, n_valid, bad), differentiable in logits: the custom op under torch.compile, its eager
    twin otherwise."""
    if _checks.eager_fast_path(logits, labels):
        return _CrossEntropyFunction.apply(logits, labels, *args)
    return _ce_fwd_op(logits, labels, *args)


# ---- public API ---------------------------------------------------------------------------------

def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", softcap: Optional[float] = None, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, return_z_loss: bool = False):
    """Fused cross-entropy loss over logits (the LM head's loss), with its gradient.

    Equal to ``F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1),
    ignore_index=ignore_index, reduction=reduction)`` (soft-capped logits first when `softcap`),
    without materialising any [N, V] intermediate: the forward reads the logits once, the backward
    reads them once more and writes the gradient.

    Args:
        logits: [N, V] or [..., V] (the class dimension is the LAST one, unlike F.cross_entropy's
            [N, C, d1, ...] layout), float32 / float16 / bfloat16 (float64: reference only). Any
            strides with a contiguous last dimension are read in place (a [B, T, V] slice such as
            logits[:, :-1] included); a non-contiguous last dimension is copied first.
        labels: int64 or int32 class indices, shape logits.shape[:-1] or flat [N]; each in
            [0, V) or equal to ignore_index. Checked on CPU tensors in eager mode (ValueError); on
            CUDA, under torch.compile and in CUDA graph capture, without a host sync, by an
            assert_async when the op runs (a device-side assert on CUDA, as PyTorch's).
        ignore_index: label value whose rows contribute nothing (default -100, Hugging Face's).
        reduction: "mean" over the non-ignored rows (NaN when every row is ignored, like
            PyTorch; the gradient is then zero), "sum", or "none" (the per-row loss with the
            labels' leading shape logits.shape[:-1], 0 at ignored rows).
        softcap: Gemma-style soft-capping applied to the logits inside the kernel,
            z = softcap * tanh(x / softcap), differentiated through; None or 0: none.
        label_smoothing: eps in [0, 1], PyTorch's: the loss of a row is
            (1 - eps) (lse - z[label]) + eps (lse - mean(z)) (z the soft-capped logits), computed in the
            kernels' one pass over the logits.
        z_loss: coefficient of the z-loss (PaLM, Liger-Kernel's lse_square_scale): z_loss * lse^2 is added
            to the loss of every row not ignored (reduced with it), pulling the logsumexp towards 0.
        return_z_loss: return (loss, z_term), z_term that z-loss part of the loss with the same reduction
            and shape, detached (for logging; zeros without z_loss).

    Returns a float32 tensor (float64 for float64 logits): the loss is accumulated in float32 for
    every input dtype, i.e. it equals F.cross_entropy(logits.float(), ...). Note that
    F.cross_entropy(logits) on float16/bfloat16 logits itself would return the logits' dtype.
    The gradient with respect to logits has the logits' dtype and shape.
    """
    deferred = _check(logits, labels, ignore_index, reduction)
    sc = _softcap(softcap)
    eps, lam, with_z = _loss_terms(label_smoothing, z_loss, return_z_loss)
    lead = logits.shape[:-1]
    backend = _backend_for(logits.device, logits.dtype)
    if backend == "triton" and logits.numel() and _checks._functorch_active():
        # torch.func.grad / jacrev through the custom op raised PyTorch's "must override the setup_context
        # staticmethod" (F.cross_entropy runs there): the reference, plain PyTorch, as linear_cross_entropy does
        _backend.warn_once(("cross_entropy", "functorch"), "llmkern.cross_entropy under torch.func transforms runs "
                           "the reference (F.cross_entropy on float32 logits), not the kernels")
        backend = "reference"
    if backend != "triton" or logits.numel() == 0:
        if deferred:
            _assert_labels(labels, logits.shape[-1], ignore_index, deferred)
        return ref.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction,
                                 softcap=sc or None, label_smoothing=eps, z_loss=lam, return_z_loss=with_z)
    x = _flat_logits(logits)
    out, lse, n_valid, bad = _ce_fwd(x, labels.reshape(-1), int(ignore_index), sc, reduction, eps, lam)
    if deferred:  # (on the forward kernel's count of out-of-range labels: no host sync)
        _checks.assert_async(bad == 0, deferred)
    if reduction == "none":
        out = out.reshape(lead)
    if not with_z:
        return out
    # (from the saved logsumexp, as the op's forward adds it: [N] work, no second pass over the logits)
    z_term = _reduce(_z_rows(lse, lam), n_valid, reduction)
    return out, (z_term.reshape(lead) if reduction == "none" else z_term)


# ---- fused linear + cross-entropy (the LM head and its loss, without the [N, V] logits) -----------

_LCE_CHUNK_ELEMENTS = 1 << 26  # logits elements per chunk: 128 MB in 16 bits, 256 MB in float32


def _lce_chunk_rows(N, V, chunk_size):
    if chunk_size:
        return int(chunk_size)
    return max(1, min(N, _LCE_CHUNK_ELEMENTS // max(V, 1)))


_OUT_DTYPE_MM = {}  # (device type, input dtype) -> whether torch.mm(..., out_dtype=float32) runs there


def _add_mm(acc, a, b):
    """acc += a @ b, with acc float32 (float64) and the product accumulated in it (16-bit a and b:
    one rounding of the product to float32 where the backend has an out_dtype matmul, found out once
    per device type and dtype)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = (a.device.type, a.dtype)
    if _OUT_DTYPE_MM.get(key, True):
        try:
            acc += torch.mm(a, b, out_dtype=acc.dtype)
            _OUT_DTYPE_MM[key] = True
            return
        except torch.OutOfMemoryError:  # (not a missing matmul: must not switch the path off for good)
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # no such matmul on this torch / device
            _OUT_DTYPE_MM[key] = False
    # (widened first: a 16-bit product of a chunk's unnormalised dlogits, a sum over its rows, overflows float16)
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _ce_rows(logits, labels, n_valid, ignore_index, softcap, mean, label_smoothing, z_loss, need_grad,
             bad_count=None):
    """(per-row loss with its z-loss, dloss/dlogits in the logits' dtype or None, per-row z-loss or None without
    z_loss) of one chunk of rows. The kernels add the chunk's out-of-range labels to bad_count (int32 0-dim); the
    reference does not count them."""
    if _backend_for(logits.device, logits.dtype) == "triton":
        kern = _kern()
        loss, lse, _ = kern.cross_entropy_forward(logits, labels, ignore_index=ignore_index, softcap=softcap,
                                                  label_smoothing=label_smoothing, bad_count=bad_count)
        z_rows = _z_rows(lse, z_loss) if z_loss else None
        if z_loss:
            loss = loss + z_rows
        if not need_grad:
            return loss, None, z_rows
        one = torch.ones((), device=logits.device, dtype=torch.float32)
        return loss, kern.cross_entropy_backward(one, logits, labels, lse, n_valid, ignore_index=ignore_index,
                                                 softcap=softcap, mean=mean, label_smoothing=label_smoothing,
                                                 z_loss=z_loss), z_rows
    # (mean: 1 / n_valid folded into the gradient; every row ignored: zero, as in the kernels)
    out = ref.cross_entropy_chunk(logits, labels, ignore_index=ignore_index, softcap=softcap or None,
                                  need_grad=need_grad, label_smoothing=label_smoothing, z_loss=z_loss,
                                  grad_scale=n_valid.clamp_min(1).double().reciprocal() if mean else 1.0,
                                  return_lse=bool(z_loss))
    d = out[1]
    return out[0], None if d is None else d.to(logits.dtype), z_loss * out[2].square() if z_loss else None


def _dw_dtype(dtype):
    """The dtype of the weight gradient the forward keeps until the backward: bfloat16 for a bfloat16 head
    (the gradient autograd returns has that dtype anyway: half of float32's 4·V·d bytes kept), float32
    otherwise (float64 for float64). float16 keeps float32: its range cannot hold the summed loss's dW (a
    frequent label sums thousands of rows: 8192 rows of |h| = 16 make 131072 > 65504), and dividing by
    n_valid first would put rare labels' rows in float16's subnormals before a loss scale could reach them."""
    if dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lce_impl(hidden, weight, bias, labels, ignore_index, softcap, reduction, chunk_size, need_dh, need_dw,
              need_db, label_smoothing=0.0, z_loss=0.0):
    """(loss, dh [N, d] or empty, dW [V, d] or empty (_dw_dtype), db float32 [V] or empty, z_term: the z-loss
    part of the loss, reduced as it, float32 0-dim, bad: the kernels' count of labels neither in [0, V) nor
    ignore_index, int32 0-dim, 0 on the reference): the gradients
    of the summed loss (upstream gradient 1, no 1 / n_valid) are computed here, chunk by chunk, while each
    chunk's logits exist; the backward scales them by g (/ n_valid for "mean") in float32. The logits never
    exist for more than one chunk of rows. (Unnormalised, the 16-bit dlogits and dh are p - onehot and
    (p - onehot) W, whatever the token count: with 1 / n_valid folded in, a float16 p / N underflowed before
    a loss scale (GradScaler's) could reach it.) A bfloat16 dW is accumulated in float32 and, once complete,
    divided by n_valid ("mean") in float32 and rounded once to bfloat16 (see _lce_backward)."""
    d, V = hidden.shape[-1], weight.shape[0]
    h, y = hidden.reshape(-1, d), labels.reshape(-1)
    N = h.shape[0]
    n_valid = _n_valid(y, V, ignore_index)
    mean = reduction == "mean"
    need_db = need_db and bias is not None
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    dh = h.new_empty(h.shape) if need_dh else h.new_empty(0)  # contiguous, as the fake says (not h's strides)
    dw = torch.zeros(V, d, device=h.device, dtype=acc) if need_dw else h.new_empty(0, dtype=acc)
    db = torch.zeros(V, device=h.device, dtype=acc) if need_db else h.new_empty(0, dtype=acc)
    total = torch.zeros((), device=h.device, dtype=acc)
    z_total = torch.zeros((), device=h.device, dtype=acc)
    bad = torch.zeros((), device=h.device, dtype=torch.int32)  # (shared by the chunks' kernels)
    step = _lce_chunk_rows(N, V, chunk_size)
    logits = dl = None
    for lo in range(0, N, step):
        hc = h[lo:lo + step]
        logits = torch.nn.functional.linear(hc, weight, bias)
        loss, dl, z_rows = _ce_rows(logits, y[lo:lo + step], n_valid, ignore_index, softcap, False, label_smoothing,
                                    z_loss, need_dh or need_dw or need_db, bad)
        total += loss.sum()
        if z_rows is not None:
            z_total += z_rows.sum()
        if need_dh:
            torch.matmul(dl, weight, out=dh[lo:lo + step])
        if need_dw:
            _add_mm(dw, dl.t(), hc)
        if need_db:
            db += dl.sum(0, dtype=acc)
    if need_dw and _dw_dtype(weight.dtype) != dw.dtype:
        # Kept until the backward in the weight's dtype (bfloat16: 2·V·d bytes instead of 4·V·d). The mean's
        # 1 / n_valid is applied here, in float32, before the one rounding: the backward then only multiplies
        # by the upstream gradient g, exactly for g = 1 (bfloat16 training has no loss scale) or a power of two
        # (bfloat16 has float32's exponent range); any other g rounds the product again, at most 1 bfloat16
        # ulp from the unfused pair's (which rounds its bfloat16 dlogits before the dW GEMM as well).
        # (The float32 accumulator and its bfloat16 copy coexist for this cast, 6·V·d bytes, the chunk's logits
        # freed first; on the float32-output matmul path each chunk's dW product already allocated 4·V·d more.)
        del logits, dl
        if mean:
            dw /= n_valid.clamp_min(1)
        dw = dw.to(_dw_dtype(weight.dtype))
    if mean:
        total, z_total = total / n_valid, z_total / n_valid
    return total, dh, dw, db, z_total, bad


@torch.library.custom_op("llmkern::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                ignore_index: int, softcap: float, reduction: str, chunk_size: int, need_dh: bool,
                need_dw: bool, need_db: bool, label_smoothing: float = 0.0, z_loss: float = 0.0
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _lce_impl(hidden, weight, bias, labels, ignore_index, softcap, reduction, chunk_size, need_dh, need_dw,
                     need_db, label_smoothing, z_loss)


@_lce_fwd_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, softcap, reduction, chunk_size, need_dh, need_dw, need_db,
      label_smoothing=0.0, z_loss=0.0):
    d, V = hidden.shape[-1], weight.shape[0]
    N = hidden.numel() // d if d else 0
    f32 = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = hidden.new_empty((), dtype=f32)
    dh = hidden.new_empty((N, d)) if need_dh else hidden.new_empty(0)
    dw = hidden.new_empty((V, d), dtype=_dw_dtype(weight.dtype)) if need_dw else hidden.new_empty(0, dtype=f32)
    db = hidden.new_empty((V,), dtype=f32) if need_db and bias is not None else hidden.new_empty(0, dtype=f32)
    return loss, dh, dw, db, hidden.new_empty((), dtype=f32), hidden.new_empty((), dtype=torch.int32)


def _lce_setup(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, _, reduction = inputs[:7]
    _, dh, dw, db, z_term, bad = output
    ctx.save_for_backward(dh, dw, db, labels)
    ctx.meta = (hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype, weight.shape[0],
                ignore_index, reduction == "mean")
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(dh, dw, db, z_term, bad)


def _lce_backward(ctx, g, *_):
    dh, dw, db, labels = ctx.saved_tensors
    shape, h_dtype, w_dtype, b_dtype, V, ignore_index, mean = ctx.meta
    acc = db.dtype  # (float32, float64 for float64 inputs; db is that dtype even when empty)
    g = g.to(acc)
    scale = g
    if mean:  # (every row ignored: the saved gradients are zero)
        scale = scale / _n_valid(labels.reshape(-1), V, ignore_index).clamp_min(1)
    # the 16-bit dh widened for the product: g / n_valid is tiny with many tokens and no loss scale
    grad_h = (dh.to(acc) * scale).to(h_dtype).reshape(shape) if ctx.needs_input_grad[0] else None
    # (a bfloat16 dW already holds the mean's 1 / n_valid: only g is left, see _lce_impl)
    grad_w = (dw.to(acc) * (g if dw.dtype == torch.bfloat16 else scale)).to(w_dtype) if ctx.needs_input_grad[1] \
        else None
    grad_b = (db * scale).to(b_dtype) if ctx.needs_input_grad[2] else None
    return (grad_h, grad_w, grad_b) + (None,) * (ctx.n_inputs - 3)


_lce_fwd_op.register_autograd(_lce_backward, setup_context=_lce_setup)


_LinearCrossEntropyFunction = _checks.eager_twin("_LinearCrossEntropyFunction", _lce_impl, _lce_setup, _lce_backward,
                                                 "The eager twin of llmkern::linear_cross_entropy_fwd.")


def _check_lce(hidden, weight, bias, labels, reduction, chunk_size):
    _tensor("hidden", hidden)
    _tensor("weight", weight)
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden must be float32, float16 or bfloat16 (float64: reference), got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] < 1:  # (d = 0 raised reshape's RuntimeError)
        raise ValueError(f"hidden must have shape [..., d] with d >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        # (vocab 0, as cross_entropy's V = 0: a raw "index 0 is out of bounds" from the gather of the labels)
        raise ValueError(f"weight must have shape [vocab, {hidden.shape[-1]}] (hidden's last dim) with vocab >= 1, "
                         f"got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _tensor(name, t)
        if t.dtype != hidden.dtype or t.device != hidden.device:
            raise ValueError(f"{name} must be {hidden.dtype} on {hidden.device} like hidden, got {t.dtype} on "
                             f"{t.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for linear_cross_entropy (its gradients are "
                         f"computed in the forward), got {reduction!r}; use cross_entropy on the logits for 'none'")
    check_chunk_size(chunk_size)


def check_chunk_size(chunk_size, where=""):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"{where}chunk_size must be None or an int >= 1, got {chunk_size!r}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         softcap: Optional[float] = None, chunk_size: Optional[int] = None,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, return_z_loss: bool = False):
    """The LM head and its loss in one op: ``cross_entropy(F.linear(hidden, weight, bias), labels)``
    without ever holding the [N, V] logits (Liger's / Apple's "fused linear cross-entropy").

    The rows are processed in chunks (``chunk_size`` rows; default: 2^26 logits per chunk): each
    chunk's logits are one GEMM in the inputs' dtype, its loss and dlogits come from the
    cross-entropy kernels (the reference on CPU), and dhidden, dweight (accumulated in float32 over
    the chunks) and dbias are computed right there, those of the summed loss, so the backward only scales them
    by the upstream gradient (and 1 / n_valid for "mean") in float32: a float16 loss scale (GradScaler) acts
    as on the unfused pair. Gradients are computed only for the inputs that require them (a frozen LM
    head, as in LoRA finetuning, skips the dweight GEMMs). Peak memory: one chunk of logits and its
    gradient, plus float32 [V, d] for dweight when the weight is trained; kept until the backward as [V, d] in
    bfloat16 for a bfloat16 weight (its 1 / n_valid applied in float32 before the rounding), float32 otherwise.

    Args:
        hidden: [..., d] (the final hidden states), float32 / float16 / bfloat16.
        weight: [V, d] (the LM head's nn.Linear weight, tied or not), hidden's dtype and device.
        labels: hidden.shape[:-1] or flat [N] int64/int32 class indices (or ignore_index).
        bias: optional [V].
        ignore_index, softcap, label_smoothing, z_loss, return_z_loss: as for ``cross_entropy`` (computed
            chunk by chunk with the rest: the logits are still never whole).
        reduction: "mean" (over non-ignored rows) or "sum".
        chunk_size: rows per chunk (None: automatic).
    Under torch.autocast hidden/weight/bias are cast to the autocast dtype first, as F.linear would.
    Returns a float32 0-dim loss (float64 for float64 inputs); with return_z_loss, (loss, z_term).
    """
    dt = _checks.autocast_dtype(hidden)
    if dt is not None:
        hidden, weight, bias = (_checks.autocast_cast(dt, t) for t in (hidden, weight, bias))
    _check_lce(hidden, weight, bias, labels, reduction, chunk_size)
    deferred = _check_labels(labels, tuple(hidden.shape[:-1]), weight.shape[0], hidden.device, ignore_index,
                             "hidden.shape[:-1]", "hidden")
    sc = _softcap(softcap)
    eps, lam, with_z = _loss_terms(label_smoothing, z_loss, return_z_loss)
    if _checks._functorch_active():
        # torch.func (grad, vmap, ...) cannot run a custom op's autograd ("must override the setup_context
        # staticmethod"): the plain-PyTorch pair, which it can, with the logits formed
        _backend.warn_once(("linear_cross_entropy", "functorch"), "llmkern.linear_cross_entropy under torch.func "
                           "transforms runs the unfused F.linear + cross-entropy (the [N, V] logits are formed)")
        return ref.linear_cross_entropy(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                        reduction=reduction, softcap=sc or None, label_smoothing=eps, z_loss=lam,
                                        return_z_loss=with_z)
    grad = torch.is_grad_enabled()
    need_dh = grad and hidden.requires_grad
    need_dw = grad and weight.requires_grad
    need_db = grad and bias is not None and bias.requires_grad
    # (a chunk past 2**62 rows is one chunk, as any chunk of at least N rows: capped, it fits the custom op's int
    # argument, which 2**63 overflowed under torch.compile and dispatch modes)
    args = (int(ignore_index), sc, reduction, min(int(chunk_size or 0), 2**62), need_dh, need_dw, need_db, eps, lam)
    # (autocast off for the chunks' F.linear, which must not cast again; only where autocast is on: a meta
    # tensor's torch.autocast("meta", enabled=False) raised "unsupported scalarType")
    with torch.autocast(hidden.device.type, enabled=False) if dt is not None else contextlib.nullcontext():
        if _checks.eager_fast_path(hidden, weight, bias, labels):
            out = _LinearCrossEntropyFunction.apply(hidden, weight, bias, labels, *args)
        else:
            out = _lce_fwd_op(hidden, weight, bias, labels, *args)
    if deferred:  # (the chunks' kernels counted the out-of-range labels; the reference chunks do not)
        if _backend_for(hidden.device, hidden.dtype) == "triton":
            _checks.assert_async(out[5] == 0, deferred)
        else:
            _assert_labels(labels, weight.shape[0], ignore_index, deferred)
    return (out[0], out[4]) if with_z else out[0]


__all__ = ["cross_entropy", "linear_cross_entropy"]
