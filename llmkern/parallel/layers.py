"""Megatron-style tensor-parallel linear layers whose collectives overlap with their GEMMs.

ColumnParallelLinear: weight [out/p, in], bias [out/p]; y_local = x W_local^T + b_local.
    Without sequence parallelism x is replicated and its gradient is all-reduced in backward;
    with it, each rank holds a contiguous 1/p slice of the flattened tokens and the layer
    all-gathers them before the GEMM (backward: reduce-scatter of the input gradient).
RowParallelLinear: weight [out, in/p], bias [out] (replicated, added after the reduction);
    y = reduce(x_local W_local^T) + b, the reduction an all-reduce, or a reduce-scatter along the
    tokens under sequence parallelism (backward: all-gather of the output gradient, and the
    bias gradient all-reduced by the layer so that it is complete on every rank).

overlap="none": plain collectives. overlap="ring": the all-gather->GEMM and GEMM->reduce-scatter
are decomposed into p point-to-point ring steps that run under the chunk GEMMs; the all-reduce
(no sequence parallelism) is split along tokens into `chunks` pieces whose asynchronous
all-reduces run under the following pieces' GEMMs; in backward the input-gradient collective runs while the weight
gradient GEMMs compute (Megatron's async dgrad). Results equal "none" up to the order of the
floating-point sums.

Knobs: pieces (messages per ring step; default 2 for p = 2, else 1), chunks (token chunks of
the pipelined all-reduce; default max(4, p)), transport ("p2p": ring of batch_isend_irecv, the
default; "collective": the same decomposition made of async all-gather/reduce-scatter per row
piece). On GPUs every transfer runs on NCCL's own stream; on CPUs on gloo's threads.
Biases start at zero (replicated row bias stays identical on every rank); weights use
nn.Linear's initialisation with the full fan-in. ``from_linear`` copies exact shards.

Inputs may have any leading shape; tokens are the flattened leading dimensions. Under sequence
parallelism the column layer gathers along dim 0 (local [d0, ...] -> [p*d0, ...]) and the row
layer scatters along dim 0 (it needs d0, or else the token count, divisible by p).

``from_linear`` also takes transformers' ``Conv1D`` (GPT-2's c_attn / c_fc / c_proj: y = x W + b with W
stored [in, out]), read as the nn.Linear of weight W^T (``_as_linear``); the shard is a fresh contiguous
parameter in the layers' [out, in] layout.

LoRA: a layer may carry lora_A/lora_B factors (``from_linear`` of a PEFT-style module with
``.base_layer``, an nn.Linear or a Conv1D: PEFT's fan_in_fan_out layers, whose factors are as for
nn.Linear); the local shard then computes x W^T + s (x A^T) B^T with
``llmkern.lora_linear`` when that op is importable (else the plain math). The factor that is
replicated across ranks (A of a column layer, B of a row layer) gets its gradient all-reduced.
Factors in another dtype than the input (PEFT keeps adapters float32 on a bf16/fp16 base) are cast to
the compute dtype in the math, as ``llmkern.lora_linear`` does; their gradients come back in the
factors' own dtype.
"""
import collections.abc
import math
import numbers
import sys

import torch
import torch.nn as nn

from llmkern._backend import warn_once
from llmkern.ops._checks import autocast_cast, autocast_dtype, bool_arg, positive_int
from llmkern.parallel import comm
from llmkern.peft._plain_lora import is_hf_conv1d, linear_features
from llmkern.peft.lora import lora_scaling

OVERLAPS = ("none", "ring")
TRANSPORTS = ("p2p", "collective")  # how overlap="ring" moves its pieces (see comm)
DEFAULT_ALLREDUCE_CHUNKS = 4  # overlap="ring" without sequence parallelism: all-reduce pieces


def default_pieces(world_size, transport="p2p"):
    """Messages per ring step (sequence parallelism). With p = 2 one exchange per direction can
    hide under at most half of the compute, so the chunk travels in 2 pieces; with p >= 4 the
    ring steps alone make the pipeline fine enough. transport="collective" pipelines its
    collectives over 4 row pieces."""
    if transport == "collective":
        return 4
    return 2 if world_size == 2 else 1

# "auto": use llmkern.lora_linear for the LoRA forward when importable; "plain": x@A.T@B.T*s.
LORA_IMPL = "auto"
_fused_lora = None


def _lora_op():
    global _fused_lora
    if LORA_IMPL != "auto":
        return None
    if _fused_lora is None:
        try:
            from llmkern.ops.lora import lora_linear  # noqa: F401

            _fused_lora = lora_linear
        except Exception as exc:  # not landed (or broken): plain math, and say so once
            warn_once(("parallel", "lora"), f"llmkern.parallel: llmkern.lora_linear is not importable "
                                            f"({exc!r}); the LoRA shards use plain PyTorch math")
            _fused_lora = False
    return _fused_lora or None


class _Cfg:
    """Static configuration passed through autograd.Function.apply."""

    def __init__(self, group, world, overlap, sp, scaling, chunks, pieces, transport, what):
        self.group, self.world, self.overlap, self.sp = group, world, overlap, sp
        self.scaling, self.chunks, self.pieces, self.what = scaling, chunks, pieces, what
        self.transport = transport

    def all_gather(self, *args):
        fn = comm.ring_all_gather if self.transport == "p2p" else comm.pieces_all_gather
        return fn(*args)

    def reduce_scatter(self, *args):
        fn = comm.ring_reduce_scatter if self.transport == "p2p" else comm.pieces_reduce_scatter
        return fn(*args)

    def all_reducer(self):
        # Both transports use the backend's own asynchronous all-reduce per token chunk: measured
        # on gloo, the p2p-pipelined one (comm.PipelinedAllReduce) was slower; NCCL's all-reduce
        # is its fastest path anyway.
        return comm.AsyncChunkAllReduce(self.group)


# ---- local (per-shard) math ---------------------------------------------------------------------

def _fwd_local(x, w, A, B, s, out=None):
    """out <- x W^T (+ s (x A^T) B^T); x [m, k], w [n, k]."""
    if A is None:
        return torch.matmul(x, w.t(), out=out)
    op = _lora_op()
    if op is not None:
        y = op(x, w, None, A, B, s)
        if out is None:
            return y
        return out.copy_(y)
    y = torch.matmul(x, w.t(), out=out)
    y.add_(torch.matmul(torch.matmul(x, A.t()), B.t()), alpha=s)
    return y


def _dgrad_local(dy, w, A, B, s, out=None):
    """out <- dy W (+ s (dy B) A)."""
    dx = torch.matmul(dy, w, out=out)
    if A is not None:  # s on the rank-r product, before the next GEMM (as autograd of PEFT's y * s does: in
        # float16 a scale applied after it let (dy B) A overflow when s < 1)
        dx.add_(torch.matmul(torch.matmul(dy, B).mul_(s), A))
    return dx


class _WGrad:
    """Weight (and LoRA factor) gradients accumulated over token chunks (fp32 for 16-bit)."""

    def __init__(self, w, A, B, s, need_w, need_A, need_B):
        self.w, self.A, self.B, self.s = w, A, B, s
        self.need = {"w": need_w, "A": need_A and A is not None, "B": need_B and B is not None}
        self.acc = {}

    def _add(self, key, val):
        prev = self.acc.get(key)
        if prev is None:
            self.acc[key] = val
        else:
            if prev.dtype in (torch.float16, torch.bfloat16):
                prev = self.acc[key] = prev.float()
            prev.add_(val)

    def add(self, dy, x):
        """Accumulate the contribution of tokens dy [m, n], x [m, k]."""
        if self.need["w"]:
            self._add("w", torch.mm(dy.t(), x))
        # s on the rank-r factor before the second GEMM (see _dgrad_local)
        if self.need["B"]:
            self._add("B", torch.mm(dy.t(), torch.mm(x, self.A.t()).mul_(self.s)))
        if self.need["A"]:
            self._add("A", torch.mm(torch.mm(dy, self.B).mul_(self.s).t(), x))

    def get(self, key, like, dtype=None):
        """The gradient for `key` in `dtype` (default like's): a LoRA factor's in the factor's own dtype,
        whatever the compute dtype. Contiguous (it may be handed to a collective)."""
        if not self.need[key]:
            return None
        dtype = like.dtype if dtype is None else dtype
        g = self.acc.get(key)
        if g is None:  # no tokens
            return torch.zeros(like.shape, dtype=dtype, device=like.device)
        return g.to(dtype).contiguous()


def _lora_compute(x, A, B):
    """(A, B) in the compute dtype x.dtype, as llmkern.lora_linear uses float32 factors (PEFT's default for
    adapters) on a 16-bit base; the gradients go back to the factors' own dtype (the autograd functions return
    them so). PEFT's own layers compute the adapter path in float32 instead: results differ from them by the
    16-bit rounding of the low-rank product."""
    if A is None:
        return A, B
    return A.to(x.dtype), B.to(x.dtype)


def _grads(acc, weight, A, B, lora_dtypes):
    """{"w", "A", "B": gradient} of the parameters that need one; A, B are the compute-dtype factors,
    lora_dtypes the dtypes of the factors the layer holds."""
    out = {"w": acc.get("w", weight)}
    if A is not None:
        out["A"] = acc.get("A", A, lora_dtypes[0])
        out["B"] = acc.get("B", B, lora_dtypes[1])
    return out


def _reduce_replicated_lora_grad(cfg, key_replicated, grads):
    """All-reduce the gradient of the LoRA factor that is replicated across ranks."""
    t = grads.get(key_replicated)
    if t is not None and cfg.world > 1:
        comm.all_reduce(t, cfg.group)  # (contiguous: _WGrad.get)


# ---- autograd functions -------------------------------------------------------------------------

class _ColumnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, cfg):
        g, p = cfg.group, cfg.world
        n = weight.shape[0]
        ctx.lora_dtypes = None if A is None else (A.dtype, B.dtype)
        A, B = _lora_compute(x, A, B)
        if cfg.sp and p > 1:
            m = x.shape[0]
            out = x.new_empty((p * m, n))
            if cfg.overlap == "ring":
                x_full = cfg.all_gather(
                    x, g, lambda lo, hi, xs: _fwd_local(xs, weight, A, B, cfg.scaling, out=out[lo:hi]), cfg.pieces)
            else:
                x_full = comm.all_gather_dim0(x, g)
                _fwd_local(x_full, weight, A, B, cfg.scaling, out=out)
        else:
            x_full = x
            out = _fwd_local(x, weight, A, B, cfg.scaling)
        if bias is not None:
            out.add_(bias)
        ctx.cfg = cfg
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x_full, weight, A, B)
        return out

    @staticmethod
    def backward(ctx, dy):
        cfg = ctx.cfg
        x_full, weight, A, B = ctx.saved_tensors
        g, p, s = cfg.group, cfg.world, cfg.scaling
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        acc = _WGrad(weight, A, B, s, need_w, need_A, need_B)
        dx = None
        if not need_x:
            acc.add(dy, x_full)
        elif cfg.sp and p > 1:
            m = x_full.shape[0] // p
            if cfg.overlap == "ring":
                def partial(lo, hi):
                    part = _dgrad_local(dy[lo:hi], weight, A, B, s)
                    acc.add(dy[lo:hi], x_full[lo:hi])  # the wgrad of these rows also runs under the transfer
                    return part
                dx = cfg.reduce_scatter(g, m, partial, cfg.pieces)
            else:
                dx = comm.reduce_scatter_dim0(_dgrad_local(dy, weight, A, B, s), g)
                acc.add(dy, x_full)
        elif p > 1:
            if cfg.overlap == "ring":  # chunked dgrad, each chunk's all-reduce under the next GEMMs
                # contiguous whatever x's strides (empty_like would copy them: a transposed 2-D input
                # made every row chunk below a strided view, and the all-reduce of such a view is wrong)
                dx = x_full.new_empty(x_full.shape)
                ar = cfg.all_reducer()
                bounds = comm.chunk_bounds(dy.shape[0], cfg.chunks)
                for lo, hi in bounds:
                    _dgrad_local(dy[lo:hi], weight, A, B, s, out=dx[lo:hi])
                    ar.advance()
                    ar.start(dx[lo:hi])
                for lo, hi in bounds:  # async dgrad: the weight gradient computes meanwhile
                    acc.add(dy[lo:hi], x_full[lo:hi])
                    ar.advance()
                ar.finish()
            else:
                dx = _dgrad_local(dy, weight, A, B, s)
                comm.all_reduce(dx, g)
                acc.add(dy, x_full)
        else:
            dx = _dgrad_local(dy, weight, A, B, s)
            acc.add(dy, x_full)
        grads = _grads(acc, weight, A, B, ctx.lora_dtypes)
        _reduce_replicated_lora_grad(cfg, "A", grads)  # A is replicated in a column layer
        db = dy.sum(0) if (ctx.has_bias and need_b) else None
        return dx, grads.get("w"), db, grads.get("A"), grads.get("B"), None


class _RowFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, cfg):
        g, p, s = cfg.group, cfg.world, cfg.scaling
        M = x.shape[0]
        ctx.lora_dtypes = None if A is None else (A.dtype, B.dtype)
        A, B = _lora_compute(x, A, B)
        if p == 1:
            y = _fwd_local(x, weight, A, B, s)
        elif cfg.sp:
            m = M // p
            if cfg.overlap == "ring":
                y = cfg.reduce_scatter(g, m, lambda lo, hi: _fwd_local(x[lo:hi], weight, A, B, s), cfg.pieces)
            else:
                y = comm.reduce_scatter_dim0(_fwd_local(x, weight, A, B, s), g)
        elif cfg.overlap == "ring":
            y = x.new_empty((M, weight.shape[0]))
            ar = cfg.all_reducer()
            for lo, hi in comm.chunk_bounds(M, cfg.chunks):
                _fwd_local(x[lo:hi], weight, A, B, s, out=y[lo:hi])
                ar.advance()
                ar.start(y[lo:hi])
            ar.finish()
        else:
            y = _fwd_local(x, weight, A, B, s)
            comm.all_reduce(y, g)
        if bias is not None:
            y.add_(bias)
        ctx.cfg = cfg
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, A, B)
        return y

    @staticmethod
    def backward(ctx, dy):
        cfg = ctx.cfg
        x, weight, A, B = ctx.saved_tensors
        g, p, s = cfg.group, cfg.world, cfg.scaling
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        acc = _WGrad(weight, A, B, s, need_w, need_A, need_B)
        db, db_work, dx = None, None, None
        if ctx.has_bias and need_b:
            db = dy.sum(0)
            if cfg.sp and p > 1:  # the bias is replicated: its gradient sums over the token shards
                db = db.contiguous()
                db_work = comm.all_reduce(db, g, async_op=cfg.overlap == "ring")
        if cfg.sp and p > 1:
            m = dy.shape[0]
            if cfg.overlap == "ring":
                dx = x.new_empty(x.shape) if need_x else None

                def compute(lo, hi, dys):
                    if need_x:
                        _dgrad_local(dys, weight, A, B, s, out=dx[lo:hi])
                    acc.add(dys, x[lo:hi])
                cfg.all_gather(dy, g, compute, cfg.pieces)
            else:
                dy_full = comm.all_gather_dim0(dy, g)
                dx = _dgrad_local(dy_full, weight, A, B, s) if need_x else None
                acc.add(dy_full, x)
        else:
            dx = _dgrad_local(dy, weight, A, B, s) if need_x else None
            acc.add(dy, x)
        grads = _grads(acc, weight, A, B, ctx.lora_dtypes)
        _reduce_replicated_lora_grad(cfg, "B", grads)  # B is replicated in a row layer
        if db_work is not None and cfg.overlap == "ring":
            db_work.wait()
        return dx, grads.get("w"), db, grads.get("A"), grads.get("B"), None


class _GatherLastDim(torch.autograd.Function):
    """Forward: concatenate the feature shards of all ranks; backward: keep this rank's slice.

    segments (the whole layer's segment sizes, a column layer sharded segment by segment: each rank's
    features are its 1/p of every segment, in order): the gathered features are put back in the
    unsharded layer's order, segment 0 of ranks 0..p-1, then segment 1, ... (not rank-major)."""

    @staticmethod
    def forward(ctx, x, group, segments=None):
        ctx.group, ctx.n = group, x.shape[-1]
        p = comm.world_size(group)
        segs = list(segments) if segments is not None and len(segments) > 1 and p > 1 else None
        ctx.segments = segs
        full = comm.all_gather_last_dim(x, group)
        if segs is None:
            return full
        lead = tuple(full.shape[:-1])
        per_rank = full.view(lead + (p, ctx.n))  # [..., rank, this rank's features]
        parts, lo = [], 0
        for size in segs:  # segment j: rank 0's part j, rank 1's part j, ...
            k = size // p
            parts.append(per_rank[..., lo:lo + k].reshape(lead + (size,)))
            lo += k
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, dy):
        r = comm.rank(ctx.group)
        if ctx.segments is None:
            return dy[..., r * ctx.n:(r + 1) * ctx.n].contiguous(), None, None
        p = comm.world_size(ctx.group)
        parts, off = [], 0
        for size in ctx.segments:  # this rank's columns of every segment
            k = size // p
            parts.append(dy[..., off + r * k:off + (r + 1) * k])
            off += size
        return torch.cat(parts, dim=-1), None, None


class _ScatterLastDim(torch.autograd.Function):
    """Forward: keep this rank's slice of the features; backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        p, r = comm.world_size(group), comm.rank(group)
        n = x.shape[-1] // p
        ctx.group = group
        return x[..., r * n:(r + 1) * n].contiguous()

    @staticmethod
    def backward(ctx, dy):
        return comm.all_gather_last_dim(dy.contiguous(), ctx.group), None


def _maybe_no_compile(fn, _cache={}):
    # The collectives inside are opaque to torch.compile: a compiled model graph-breaks here.
    # (Imported lazily: importing torch._dynamo costs seconds, and only compiling needs it.)
    if "torch._dynamo" not in sys.modules:
        return fn
    wrapped = _cache.get(fn)
    if wrapped is None:
        wrapped = _cache[fn] = torch.compiler.disable(fn)
    return wrapped


def _column_apply(*args):
    return _maybe_no_compile(_ColumnFn.apply)(*args)


def _row_apply(*args):
    return _maybe_no_compile(_RowFn.apply)(*args)


# ---- modules ------------------------------------------------------------------------------------

def column_rows(t, segments, p, r):
    """Rank r's rows of t (dim 0) under column sharding: its 1/p of every segment, in order."""
    parts, lo = [], 0
    for n in segments:
        k = n // p
        parts.append(t[lo + r * k: lo + (r + 1) * k])
        lo += n
    return torch.cat(parts, 0)


def gather_column_rows(t, segments, group):
    """The whole t (dim 0) from every rank's column_rows(t, segments, p, r) shard: the inverse of column_rows (one
    all-gather over `group`), rows back in the unsharded order (segment 0 of ranks 0..p-1, then segment 1, ...)."""
    p = comm.world_size(group)
    if p == 1:
        return t.clone()
    per_rank = comm.all_gather_dim0(t.contiguous(), group).view((p, t.shape[0]) + tuple(t.shape[1:]))
    parts, lo = [], 0
    for n in segments:
        k = n // p
        parts.append(per_rank[:, lo:lo + k].reshape((n,) + tuple(t.shape[1:])))
        lo += k
    return torch.cat(parts, 0)


def _source_names(linear, base, A, B):
    """{the sharded layer's parameter name: the name of the tensor it was cut from in `linear`'s state dict} where they
    differ (a LoRA wrapper's base_layer.weight, PEFT's lora_A.default.weight): full checkpoints
    (llmkern.parallel.tensor_parallel.full_state_dict) use the unsharded model's keys."""
    if not hasattr(linear, "base_layer"):
        return {}
    base_layer = linear.base_layer
    sources = {"weight": base_layer.weight, "bias": base.bias, "lora_A": A, "lora_B": B}
    by_id = {id(t): n for n, t in linear.state_dict(keep_vars=True).items()}
    names = {own: by_id.get(id(t)) for own, t in sources.items() if t is not None}
    return {own: n for own, n in names.items() if n is not None and n != own}


def _check_divisible(size, p, what):
    if size % p:
        raise ValueError(f"{what}={size} is not divisible by the tensor-parallel world size {p}")


class _LinearView:
    """What from_linear reads of a transformers Conv1D: the nn.Linear it computes, weight W^T [out, in] (a detached
    view of the Conv1D's [in, out] parameter, with its requires_grad also under no_grad: from_linear copies its
    shard out of it) and the bias."""

    def __init__(self, conv1d):
        w = conv1d.weight
        self.weight, self.bias = w.detach().t().requires_grad_(w.requires_grad), conv1d.bias
        self.in_features, self.out_features = linear_features(conv1d)


def _as_linear(layer):
    """`layer` as from_linear reads it (in_features, out_features, weight [out, in], bias): an nn.Linear as it is,
    transformers' Conv1D (y = x W + b, W [in, out]) as a _LinearView of W^T, anything else None."""
    if isinstance(layer, nn.Linear):
        return layer
    return _LinearView(layer) if is_hf_conv1d(layer) else None


def _lora_parts(module):
    """(base nn.Linear (or a Conv1D's _LinearView), lora_A [r, in] or None, lora_B [out, r] or None, scaling) of a
    plain nn.Linear / Conv1D or a PEFT-style LoRA wrapper of one (.base_layer + lora_A/lora_B modules, dicts of
    them, or tensors; .scaling a float or a dict; a Conv1D base is PEFT's fan_in_fan_out, its factors are as for
    nn.Linear). A merged wrapper is its base layer (the update is
    in the weight); disabled adapters, DoRA, dropout, a bias on lora_B (PEFT's lora_bias) and several
    active adapters are not supported (errors, so that the sharded layer never computes something other
    than the wrapper). Per-adapter dicts are read at the active adapter's key."""
    if not hasattr(module, "base_layer"):
        plain = _as_linear(module)
        if plain is not None:
            return plain, None, None, 1.0
    base = _as_linear(getattr(module, "base_layer", None))
    if base is None:
        raise TypeError(f"from_linear expects an nn.Linear (or a transformers Conv1D) or a LoRA wrapper with "
                        f"one as .base_layer, got {type(module).__name__}")
    _check_lora_state(module)
    if getattr(module, "merged", False):
        return base, None, None, 1.0
    init = getattr(module, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora")):
        # (its adapter is one of the rewritten base weight: the sharded layer would drop the initial factors that
        # save_peft_adapter(convert_to_original_base=True) needs, and save it as an adapter of the original model)
        raise NotImplementedError(f"from_linear: the {type(module).__name__} was initialised with "
                                  f"init_lora_weights={init!r}, which tensor-parallel LoRA layers do not carry: "
                                  f"merge it (merge_lora) or save it converted first")

    active = _active_adapter(module)
    lora_bias = getattr(module, "lora_bias", False)  # PEFT: per adapter
    if isinstance(lora_bias, dict):
        lora_bias = bool(lora_bias) and lora_bias[_adapter_key(lora_bias, active)]
    if lora_bias is True:  # (the update gains scaling * lora_B.bias)
        raise NotImplementedError(f"from_linear: the {type(module).__name__} uses lora_bias=True (a bias on "
                                  f"lora_B), which tensor-parallel LoRA layers do not support")

    def pick(v, what):
        if isinstance(v, (nn.ModuleDict, nn.ParameterDict, dict)):
            return pick(v[_adapter_key(v, active)], what) if len(v) else None
        if isinstance(v, nn.Linear):
            if v.bias is not None:
                raise NotImplementedError(f"from_linear: the {type(module).__name__}'s {what} has a bias, which "
                                          f"tensor-parallel LoRA layers do not support")
            return v.weight
        if isinstance(v, torch.Tensor):
            return v
        if v is None:
            return None
        raise TypeError(f"from_linear: cannot read a LoRA factor from {type(v).__name__}")

    A, B = pick(getattr(module, "lora_A", None), "lora_A"), pick(getattr(module, "lora_B", None), "lora_B")
    s = getattr(module, "scaling", 1.0)
    if isinstance(s, dict):
        s = s[_adapter_key(s, active)]
    drop = getattr(module, "lora_dropout", getattr(module, "dropout", None))  # PEFT's name, then ours
    if isinstance(drop, (nn.ModuleDict, dict)) and len(drop):
        drop = drop[_adapter_key(drop, active)]  # (the active adapter's: another's dropout is not used)
    p_drop = getattr(drop, "p", 0.0) if drop is not None else 0.0
    if isinstance(drop, (float, int)) and not isinstance(drop, bool):
        p_drop = drop
    if p_drop and p_drop > 0:
        raise NotImplementedError("tensor-parallel LoRA layers do not support lora_dropout > 0")
    if (A is None) != (B is None):
        raise ValueError("from_linear: a LoRA wrapper needs both lora_A and lora_B")
    if A is not None:
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != base.in_features or B.shape[0] != base.out_features \
                or A.shape[0] != B.shape[1]:
            raise ValueError(f"from_linear: LoRA factors must be A [r, {base.in_features}] and "
                             f"B [{base.out_features}, r], got {tuple(A.shape)} and {tuple(B.shape)}")
    return base, A, B, float(s)


def _lora_alpha(module, r, s):
    """(alpha, use_rslora) of a LoRA wrapper whose scaling is s (LoRALinear's .alpha/.use_rslora, PEFT's
    .lora_alpha dict), or (None, None) when it does not say or they do not give back s exactly."""
    alpha = getattr(module, "alpha", getattr(module, "lora_alpha", None))
    if isinstance(alpha, dict):  # PEFT: per adapter; _lora_parts took the active one's factors
        alpha = alpha[_adapter_key(alpha, _active_adapter(module))] if alpha else None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return None, None
    flag = getattr(module, "use_rslora", None)
    for rs in ((bool(flag),) if isinstance(flag, bool) else (False, True)):
        if lora_scaling(alpha, r, rs) == s:
            return alpha, rs
    return None, None


def _active_adapter(module):
    """The name of the wrapper's active adapter (None: it does not say). Several active adapters that the
    layer holds are refused: PEFT sums their updates, a sharded layer holds one pair of factors."""
    active = getattr(module, "active_adapter", None)
    if not isinstance(active, (list, tuple)):
        return active
    held = getattr(module, "lora_A", None)
    if isinstance(held, (nn.ModuleDict, nn.ParameterDict, dict)):
        active = [a for a in active if a in held] or list(active)  # (PEFT skips the ones it does not hold)
    if len(active) > 1:
        raise NotImplementedError(f"from_linear: the {type(module).__name__} has {len(active)} active adapters "
                                  f"{list(active)}; tensor-parallel LoRA layers hold one (merge the others, or "
                                  f"set_adapter to one)")
    return active[0] if active else None


def _adapter_key(d, active):
    """The key of a per-adapter dict (factors, scaling, dropout, alpha) for the active adapter."""
    if active in d:
        return active
    return "default" if "default" in d else next(iter(d.keys()))


def _check_lora_state(module):
    """Wrapper states a sharded LoRA layer cannot reproduce: raise rather than compute otherwise."""
    name = type(module).__name__
    if getattr(module, "disabled", False) or getattr(module, "disable_adapters", False):
        raise NotImplementedError(f"from_linear: the {name}'s adapter is disabled; enable it, or shard "
                                  f"its .base_layer for the base model alone")
    dora = getattr(module, "use_dora", False)
    if (any(dora.values()) if isinstance(dora, dict) else bool(dora)) or len(getattr(module, "lora_magnitude_vector", ()) or ()):
        raise NotImplementedError(f"from_linear: {name} uses DoRA, which tensor-parallel LoRA layers do not support")


def _int_arg(what, name, v, optional=False):
    """v as an int >= 1 (None when optional), else ValueError naming it."""
    return None if v is None and optional else positive_int(f"{what}: {name}", v)


def _bias_arg(what, bias):
    """bias as a bool (None: no bias, as nn.Linear reads it); a string "False" made a bias, silently."""
    return False if bias is None else bool_arg(f"{what}: bias", bias)


def _from_linear_kw(what, kw):
    """from_linear takes the sizes, the bias, the device and the dtype from the linear: any of them in kw is a
    TypeError naming it (skip_init's "got multiple values for keyword argument" did not say where from)."""
    taken = [k for k in ("in_features", "out_features", "bias", "device", "dtype") if k in kw]
    if taken:
        raise TypeError(f"{what}.from_linear: {taken[0]} comes from the linear; it is not an argument of "
                        f"from_linear")


def _segments_arg(segments, out_features):
    """from_linear's segments as a list of positive ints summing to out_features (None: one segment)."""
    if segments is None or (isinstance(segments, (list, tuple)) and not segments):
        return [out_features]
    segs = list(segments) if isinstance(segments, (list, tuple)) else None
    if segs is None or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in segs) \
            or sum(segs) != out_features:
        raise ValueError(f"ColumnParallelLinear.from_linear: segments must be a list of positive ints summing to "
                         f"out_features={out_features}, got {segments!r}")
    return [int(n) for n in segs]


def _flag_arg(what, name, v):
    """bool_arg's bool (a numpy bool or a one-element bool tensor too), not an int, and a ValueError naming the layer,
    as the layers' size checks raise."""
    return bool_arg(f"{what}: {name}", v, ints=False, type_error=ValueError)


class _ParallelLinear(comm.SharesProcessGroups, nn.Module):
    _kind = ""
    # sharded from a transformers Conv1D (from_linear): PEFT adapters on it say fan_in_fan_out=True, as LoRALinear's
    # conv1d says for the unsharded layer (their factors are the nn.Linear's all the same)
    conv1d = False
    # {parameter name: its name in the unsharded module's state dict} where they differ (from_linear of a LoRA wrapper:
    # "weight" was "base_layer.weight"); full checkpoints use the unsharded names
    source_names = {}

    def _setup(self, in_features, out_features, overlap, sequence_parallel, group, chunks, pieces, transport):
        what = type(self).__name__
        if overlap not in OVERLAPS:
            raise ValueError(f"{what}: overlap must be one of {OVERLAPS}, got {overlap!r}")
        in_features, out_features = _int_arg(what, "in_features", in_features), _int_arg(what, "out_features", out_features)
        chunks, pieces = _int_arg(what, "chunks", chunks, optional=True), _int_arg(what, "pieces", pieces, optional=True)
        sequence_parallel = _flag_arg(what, "sequence_parallel", sequence_parallel)
        self.group = comm.resolve_group(group, type(self).__name__)
        self.world_size = comm.world_size(self.group)
        self.rank = comm.rank(self.group)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.overlap = overlap
        self.sequence_parallel = bool(sequence_parallel)
        self.chunks = int(chunks) if chunks is not None else max(DEFAULT_ALLREDUCE_CHUNKS, self.world_size)
        if transport not in TRANSPORTS:
            raise ValueError(f"{type(self).__name__}: transport must be one of {TRANSPORTS}, got {transport!r}")
        self.pieces = int(pieces) if pieces is not None else default_pieces(self.world_size, transport)
        self.transport = transport
        if self.chunks < 1 or self.pieces < 1:
            raise ValueError(f"{type(self).__name__}: chunks and pieces must be >= 1, got {chunks!r}, {pieces!r}")
        self.lora_A = self.lora_B = None
        self.lora_scaling = 1.0
        # the wrapper's lora_alpha / use_rslora when known (from_linear, load_peft_adapter): lets
        # save_peft_adapter write the unsharded model's alpha; None: recovered from lora_scaling
        self.lora_alpha = self.lora_use_rslora = None

    def _cfg(self):
        return _Cfg(self.group, self.world_size, self.overlap, self.sequence_parallel, self.lora_scaling,
                    self.chunks, self.pieces, self.transport, type(self).__name__)

    def _cast(self, x):
        """(x, weight, bias, lora_A, lora_B) as the layer computes with them: under torch.autocast
        cast to the autocast dtype as nn.Linear would be (gradients flow back to the float32
        parameters through the casts); otherwise as they are."""
        dt = autocast_dtype(x)
        ts = (x, self.weight, self.bias, self.lora_A, self.lora_B)
        return ts if dt is None else tuple(autocast_cast(dt, t) for t in ts)

    def _check_input(self, x, features, weight=None, cross_rank=True):
        name = type(self).__name__
        # the cross-rank check first: a local error on one rank only would leave the others
        # waiting in the next collective until the process group's timeout
        if cross_rank:
            comm.check_same_shape(x if isinstance(x, torch.Tensor) else None, self.group, name)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: input must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != features:
            raise ValueError(f"{name}: input must have {features} features in its last dimension, got "
                             f"shape {tuple(x.shape)}")
        weight = self.weight if weight is None else weight
        if x.dtype != weight.dtype:
            raise TypeError(f"{name}: input dtype {x.dtype} differs from the weight dtype {weight.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"{name}: input on {x.device}, weight on {self.weight.device}")

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"world_size={self.world_size}, overlap={self.overlap!r}, "
                f"sequence_parallel={self.sequence_parallel}, lora={'yes' if self.lora_A is not None else 'no'}")


def _init_shard(out_features, in_features, device, dtype, keep):
    """This rank's shard (keep(full)) of nn.Linear's weight init of the whole [out, in] matrix, drawn from this
    process's RNG: ranks seeded alike draw the same matrix and keep different parts of it, as Megatron's CPU
    initialisation does (with one seed, the layers hold nn.Linear's weight). Drawing only the shard gave every
    rank the same numbers: p copies of one block, which training never tells apart."""
    full = torch.empty(out_features, in_features, device=device, dtype=dtype)
    nn.init.kaiming_uniform_(full, a=math.sqrt(5))  # nn.Linear's: uniform(±1/sqrt(in))
    return keep(full).clone()


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T + b with W split along the output features: weight [out/p, in]."""

    def __init__(self, in_features, out_features, bias=True, *, gather_output=False, sequence_parallel=False,
                 overlap="ring", group=None, chunks=None, pieces=None, transport="p2p", device=None, dtype=None):
        super().__init__()
        bias = _bias_arg("ColumnParallelLinear", bias)
        self._setup(in_features, out_features, overlap, sequence_parallel, group, chunks, pieces, transport)
        _check_divisible(self.out_features, self.world_size, "ColumnParallelLinear: out_features")
        self.gather_output = _flag_arg("ColumnParallelLinear", "gather_output", gather_output)
        if self.gather_output and self.sequence_parallel:
            raise ValueError("ColumnParallelLinear: gather_output=True cannot be combined with sequence_parallel=True")
        n = self.out_features // self.world_size
        r = self.rank
        self.weight = nn.Parameter(_init_shard(self.out_features, self.in_features, device, dtype,
                                               lambda full: full[r * n:(r + 1) * n]))
        self.bias = nn.Parameter(torch.zeros(n, device=device, dtype=dtype)) if bias else None

    @property
    def out_features_per_rank(self):
        return self.out_features // self.world_size

    def _product(self, x, w, b, A, B):
        """x [..., in] (this rank's token shard under sequence parallelism) -> [..., out/p] over all tokens."""
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)
        if self.sequence_parallel and self.world_size > 1:
            lead = (lead[0] * self.world_size,) + lead[1:] if lead else (self.world_size * x2.shape[0],)
        y = _column_apply(x2, w, b, A, B, self._cfg())
        return y.view(lead + (y.shape[-1],))

    def forward(self, x):
        x, w, b, A, B = self._cast(x)
        self._check_input(x, self.in_features, w)
        y = self._product(x, w, b, A, B)
        if self.gather_output and self.world_size > 1:
            # in the unsharded layer's feature order, also for a segment-sharded (fused qkv) layer
            y = _GatherLastDim.apply(y, self.group, getattr(self, "segments", None))
        return y

    @classmethod
    def from_linear(cls, linear, group=None, **kw):
        """Shard an existing nn.Linear (or a transformers Conv1D, read as the nn.Linear of W^T, or a
        PEFT-style LoRA wrapper of either) along its output features: this rank keeps rows
        [r*out/p, (r+1)*out/p). The weights must be identical on every rank. `segments` (a list of
        row counts summing to out_features) shards a fused projection (e.g. qkv) segment by segment;
        with gather_output=True the gathered features are in the linear's order ([q | k | v]), not
        rank by rank."""
        segments = kw.pop("segments", None)
        _from_linear_kw(cls.__name__, kw)
        base, A, B, s = _lora_parts(linear)
        segs = _segments_arg(segments, base.out_features)
        layer = nn.utils.skip_init(cls, base.in_features, base.out_features, bias=base.bias is not None, group=group,
                                   device=base.weight.device, dtype=base.weight.dtype, **kw)  # (copied below)
        p, r = layer.world_size, layer.rank
        layer.segments = segs  # (how the rows were sharded: llmkern.parallel.lora_state gathers by it)
        layer.conv1d = isinstance(base, _LinearView)
        layer.source_names = _source_names(linear, base, A, B)

        for n in segs:
            _check_divisible(n, p, "ColumnParallelLinear.from_linear: segment size")

        def rows(t):
            return column_rows(t, segs, p, r).detach().clone()

        with torch.no_grad():
            layer.weight.copy_(rows(base.weight))
            if base.bias is not None:
                layer.bias.copy_(rows(base.bias))
        layer.weight.requires_grad_(base.weight.requires_grad)
        if layer.bias is not None:
            layer.bias.requires_grad_(base.bias.requires_grad)
        if A is not None:
            layer.lora_A = nn.Parameter(A.detach().clone(), requires_grad=A.requires_grad)  # replicated
            layer.lora_B = nn.Parameter(rows(B), requires_grad=B.requires_grad)
            layer.lora_scaling = s
            layer.lora_alpha, layer.lora_use_rslora = _lora_alpha(linear, A.shape[0], s)
        return layer


def _hooked(m):
    """Hooks or a patched forward that a joint call would skip: forward and backward hooks (the module's and the
    global ones) and a forward set on the instance (accelerate, probing tools)."""
    from torch.nn.modules import module as nn_module
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks
                or "forward" in m.__dict__)


def _fusable(layers):
    """Whether column layers reading one input can run as one product: plain ColumnParallelLinear layers (no
    LoRA factors, no gather_output) of one configuration, the same on every rank of a model sharded alike.
    (Hooks, which one rank may have alone, are decided across the ranks: column_parallel_shared_input.)"""
    first = layers[0]
    key = lambda m: (m.group, m.world_size, m.overlap, m.sequence_parallel, m.chunks, m.pieces,  # noqa: E731
                     m.transport, m.in_features, m.weight.dtype, m.weight.device, m.bias is None)
    return len(layers) > 1 and all(
        type(m) is ColumnParallelLinear and m.lora_A is None and not m.gather_output and key(m) == key(first)
        for m in layers)


def _shared_input_layers(layers):
    """column_parallel_shared_input's `layers` as a list, or an error naming it."""
    what = "column_parallel_shared_input: layers"
    if not isinstance(layers, collections.abc.Iterable):  # (a single layer; a ModuleList is a sequence)
        raise TypeError(f"{what} must be a sequence of modules (e.g. [q_proj, k_proj, v_proj]), got "
                        f"{type(layers).__name__}")
    layers = list(layers)
    if not layers:
        raise ValueError(f"{what} must hold at least one module, got none")
    bad = [i for i, m in enumerate(layers) if not callable(m)]
    if bad:
        raise TypeError(f"{what} must hold modules (callables), got {type(layers[bad[0]]).__name__} at index "
                        f"{bad[0]}")
    flags = [getattr(m, "sequence_parallel", False) for m in layers if isinstance(m, ColumnParallelLinear)]
    if len(set(flags)) > 1:
        desc = ", ".join(f"{i}: {m.sequence_parallel}" for i, m in enumerate(layers)
                         if isinstance(m, ColumnParallelLinear))
        raise ValueError(f"{what}: the column-parallel layers disagree on sequence_parallel (by index: {desc}): "
                         f"they read one input, which the sequence-parallel ones take as a shard of the tokens "
                         f"and the others as the whole sequence")
    return layers


def column_parallel_shared_input(x, layers):
    """[layer(x) for layer in layers], for column-parallel layers that read the same input (q / k / v, gate /
    up), run as ONE column-parallel product over their stacked weights, as Megatron-LM's fused QKV and
    gate-up layers are: one input-gradient all-reduce in the backward (or, under sequence parallelism, one
    all-gather of x in the forward and one reduce-scatter back) instead of one per layer, overlapped with
    the stacked weight gradient's GEMM. Layers that cannot be fused (LoRA factors, gather_output, hooks,
    different configurations) run one by one. The outputs are views into one [..., Σ out/p] tensor.

    ValueError / TypeError naming `layers` when it is empty, not a sequence of modules, or its column-parallel
    layers disagree on sequence_parallel (one input cannot be both the token shard some read and the whole
    sequence the others read)."""
    layers = _shared_input_layers(layers)
    if not (isinstance(layers[0], ColumnParallelLinear) and _fusable(layers)):
        return tuple(m(x) for m in layers)
    first = layers[0]
    # Every rank must take the same path (one product's collectives, or each layer's): the verdicts travel in
    # the input check's all-gather, and one rank that cannot fuse (a hook of its own) makes all run one by one.
    # (With validation off nothing is gathered: the layers' hooks must then agree across the ranks.)
    here = not any(_hooked(m) for m in layers)
    verdicts = comm.check_same_shape(x if isinstance(x, torch.Tensor) else None, first.group,
                                     "ColumnParallelLinear", flag=here)
    if not (all(verdicts) if verdicts is not None else here):
        return tuple(m(x) for m in layers)
    casts = [m._cast(x) for m in layers]
    x = casts[0][0]
    w = torch.cat([c[1] for c in casts], 0)
    b = None if first.bias is None else torch.cat([c[2] for c in casts], 0)
    first._check_input(x, first.in_features, casts[0][1], cross_rank=False)
    y = first._product(x, w, b, None, None)
    return tuple(y.split([m.out_features_per_rank for m in layers], dim=-1))


ColumnParallelLinear.forward_shared_input = staticmethod(column_parallel_shared_input)


class RowParallelLinear(_ParallelLinear):
    """y = x W^T + b with W split along the input features: weight [out, in/p]; b replicated."""

    def __init__(self, in_features, out_features, bias=True, *, input_is_parallel=True, sequence_parallel=False,
                 overlap="ring", group=None, chunks=None, pieces=None, transport="p2p", device=None, dtype=None):
        super().__init__()
        bias = _bias_arg("RowParallelLinear", bias)
        self._setup(in_features, out_features, overlap, sequence_parallel, group, chunks, pieces, transport)
        _check_divisible(self.in_features, self.world_size, "RowParallelLinear: in_features")
        self.input_is_parallel = _flag_arg("RowParallelLinear", "input_is_parallel", input_is_parallel)
        if self.sequence_parallel and not self.input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True")
        k = self.in_features // self.world_size
        r = self.rank
        self.weight = nn.Parameter(_init_shard(self.out_features, self.in_features, device, dtype,
                                               lambda full: full[:, r * k:(r + 1) * k]))
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype)) if bias else None

    @property
    def in_features_per_rank(self):
        return self.in_features // self.world_size

    def forward(self, x):
        p = self.world_size
        x, w, b, A, B = self._cast(x)
        if not self.input_is_parallel:
            self._check_input(x, self.in_features, w)
            x = _ScatterLastDim.apply(x, self.group) if p > 1 else x
        else:
            self._check_input(x, self.in_features_per_rank, w)
        lead = tuple(x.shape[:-1])
        x2 = x.reshape(-1, x.shape[-1])
        if self.sequence_parallel and p > 1:
            M = x2.shape[0]
            if M % p:
                raise ValueError(f"RowParallelLinear: with sequence_parallel the number of tokens ({M}) must "
                                 f"be divisible by the world size {p}")
            lead = (lead[0] // p,) + lead[1:] if lead and lead[0] % p == 0 else (M // p,)
        y = _row_apply(x2, w, b, A, B, self._cfg())
        return y.view(lead + (self.out_features,))

    @classmethod
    def from_linear(cls, linear, group=None, **kw):
        """Shard an existing nn.Linear (or a transformers Conv1D, read as the nn.Linear of W^T, or a
        PEFT-style LoRA wrapper of either) along its input features: this rank keeps columns
        [r*in/p, (r+1)*in/p). Weights must match on every rank."""
        _from_linear_kw(cls.__name__, kw)
        base, A, B, s = _lora_parts(linear)
        layer = nn.utils.skip_init(cls, base.in_features, base.out_features, bias=base.bias is not None, group=group,
                                   device=base.weight.device, dtype=base.weight.dtype, **kw)  # (copied below)
        p, r = layer.world_size, layer.rank
        layer.conv1d = isinstance(base, _LinearView)
        layer.source_names = _source_names(linear, base, A, B)
        k = base.in_features // p
        with torch.no_grad():
            layer.weight.copy_(base.weight[:, r * k:(r + 1) * k])
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        layer.weight.requires_grad_(base.weight.requires_grad)
        if layer.bias is not None:
            layer.bias.requires_grad_(base.bias.requires_grad)
        if A is not None:
            layer.lora_A = nn.Parameter(A[:, r * k:(r + 1) * k].detach().clone(), requires_grad=A.requires_grad)
            layer.lora_B = nn.Parameter(B.detach().clone(), requires_grad=B.requires_grad)  # replicated
            layer.lora_scaling = s
            layer.lora_alpha, layer.lora_use_rslora = _lora_alpha(linear, A.shape[0], s)
        return layer
