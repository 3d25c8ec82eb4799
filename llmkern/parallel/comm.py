"""Communication helpers of the tensor-parallel layers: process-group checks, plain collectives
(the ``overlap="none"`` baseline) and the decomposed, compute-overlapped ones (``"ring"``).

Decomposed collectives (the "collective matmul" of Wang et al., ASPLOS'23):

- ``ring_all_gather(x, group, compute)``: p steps; at step s every rank sends the chunk it holds
  to rank+1 and receives the next one from rank-1 (``batch_isend_irecv``) while ``compute``
  runs on the chunk it already has. Returns the gathered tensor ``[p, *x.shape]``.
- ``ring_reduce_scatter(group, partial)``: p steps; at step s a rank computes its partial
  result for chunk ``(rank - 1 - s) mod p`` while the running sum of the previous chunk travels
  to it; after p steps rank r holds the full sum for chunk r.
- ``PipelinedAllReduce``: the tokens are split in ``chunks`` pieces; each piece's all-reduce
  (point-to-point ring steps) starts as soon as its GEMM is done and advances between the
  following GEMMs, so it runs under them.

On GPUs (NCCL) every transfer runs on NCCL's own stream; on CPUs (gloo) on gloo's threads, so
the overlap is real in both cases. Every helper raises a clear error instead of hanging: shapes
are checked across ranks (one small all-gather, see ``set_validation``) before a decomposed
collective starts, and the process group's timeout bounds every wait.
"""
import copy
import os
import warnings

import torch
import torch.distributed as dist

_VALIDATE = os.environ.get("LLMKERN_TP_VALIDATE", "1") != "0"
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]


def set_validation(enabled):
    """Turn the per-call cross-rank shape check on (default; env LLMKERN_TP_VALIDATE=0 turns it
    off) or off. It costs one tiny all-gather per layer call; without it, ranks that pass
    different shapes fail only by the process group's timeout."""
    global _VALIDATE
    previous = _VALIDATE
    _VALIDATE = bool(enabled)
    return previous


def validation_enabled():
    return _VALIDATE


def resolve_group(group=None, what="llmkern.parallel"):
    """The process group to use (WORLD for None); a clear error when there is none, or when `group` is not a
    ProcessGroup."""
    if not dist.is_available():
        raise RuntimeError(f"{what}: torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what}: no process group: torch.distributed is not initialized. Call "
            f"torch.distributed.init_process_group(...) first (torchrun sets up the environment; "
            f"llmkern.parallel.launch.spawn does it for local runs), then pass group= or use WORLD.")
    if group is None:
        return dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):  # (a rank number or a backend name failed deep inside torch)
        raise TypeError(f"{what}: group must be a torch.distributed ProcessGroup (or None: WORLD), got "
                        f"{type(group).__name__}")
    return group


def world_size(group):
    return dist.get_world_size(group)


def rank(group):
    return dist.get_rank(group)


def global_rank(group, group_rank):
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _meta_device(t, group):
    """Where a small metadata tensor must live for this group's backend."""
    try:
        backend = dist.get_backend(group)
    except Exception:  # pragma: no cover
        backend = "gloo"
    if "nccl" in str(backend).lower():
        return t.device if t is not None and t.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same_shape(t, group, what, flag=None):
    """Raise ValueError on every rank when `t` does not have the same shape and dtype on all
    ranks of `group` (one all-gather of 10 int64s). flag: an int per rank carried in the same all-gather;
    returns every rank's (None when nothing was gathered: validation off, or one rank)."""
    p = world_size(group)
    if not _VALIDATE or p == 1:
        return None
    if t is None:  # not a tensor on this rank: a row no tensor has
        meta = [-1, 98] + [-1] * 8
    else:
        shape = list(t.shape)
        meta = [len(shape), _DTYPES.index(t.dtype) if t.dtype in _DTYPES else 99]
        meta += shape[:8] + [-1] * (8 - len(shape[:8]))
        if len(shape) > 8:
            meta[-1] = int(torch.Size(shape[7:]).numel())
    m = torch.tensor(meta + ([] if flag is None else [int(flag)]), dtype=torch.int64, device=_meta_device(t, group))
    out = torch.empty(p * m.numel(), dtype=torch.int64, device=m.device)
    all_gather_into(out, m, group)
    rows = out.view(p, -1).tolist()
    flags = None if flag is None else [r.pop() for r in rows]
    if any(row != rows[0] for row in rows):
        desc = "; ".join(f"rank {i}: not a tensor" if r[0] < 0 else f"rank {i}: shape {tuple(r[2:2 + r[0]][:8])} "
                         f"dtype {_DTYPES[r[1]] if r[1] < len(_DTYPES) else 'other'}" for i, r in enumerate(rows))
        raise ValueError(f"{what}: the input differs across tensor-parallel ranks ({desc}); every rank "
                         f"must pass the same shape and dtype")
    return flags


# ---- plain collectives (the "none" baseline), tolerant of old and new torch names -------------

def _quiet(fn, *args, **kw):
    # torch >= 2.12 deprecates all_gather_into_tensor/reduce_scatter_tensor in favour of
    # *_single, which torch 2.11 lacks: keep the names both have and silence the FutureWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kw)


def all_gather_into(out, x, group, async_op=False):
    """out [p * x.shape[0], *x.shape[1:]] <- x of every rank, in rank order."""
    return _quiet(dist.all_gather_into_tensor, out, x.contiguous(), group=group, async_op=async_op)


def gather_ints(row, group):
    """Every rank's list of ints `row` (one length on every rank), in rank order: one small all-gather (the
    argument checks that must agree across ranks before any collective that could hang)."""
    if world_size(group) == 1:
        return [list(row)]
    t = torch.tensor(row, dtype=torch.int64, device=_meta_device(None, group))
    out = t.new_empty(world_size(group) * t.numel())
    all_gather_into(out, t, group)
    return out.view(world_size(group), -1).tolist()


def ids_in_range(input_ids, V):
    """Whether this rank's (CPU) token ids lie in [0, V), for a cross-rank verdict: a model's own check raises on
    its rank only, after which the others would wait in the next collective until the process group's timeout.
    CUDA ids are not read (a host sync per forward, as the models' own checks skip them too), nor traced ones."""
    if (not torch.is_tensor(input_ids) or input_ids.device.type != "cpu" or not input_ids.numel()
            or input_ids.is_floating_point() or torch.compiler.is_compiling()):
        return True
    lo, hi = input_ids.aminmax()
    return 0 <= int(lo) and int(hi) < V


def agree(group, what, meta, error=None):
    """The setup checks that must agree across ranks: one all-gather of (this rank's error flag, *meta ints), made
    by every rank, also one whose own checks failed (so that none is left waiting in it). Raises this rank's error
    (a message: ValueError), or the same ValueError on every rank naming the ranks that failed; else returns every
    rank's meta, in rank order, for the caller to compare."""
    rows = gather_ints([1 if error is not None else 0] + [int(v) for v in meta], group)
    if error is not None:
        raise error if isinstance(error, Exception) else ValueError(error)
    failed = [i for i, r in enumerate(rows) if r[0]]
    if failed:
        raise ValueError(f"{what}: failed on rank(s) {failed} (their error says why); every rank must pass the same "
                         f"model and arguments")
    return [r[1:] for r in rows]


def reduce_scatter_into(out, x, group, async_op=False):
    """out [x.shape[0] / p, ...] <- this rank's slice of the sum of x over ranks."""
    return _quiet(dist.reduce_scatter_tensor, out, x.contiguous(), group=group, async_op=async_op)


def all_gather_dim0(x, group):
    p = world_size(group)
    out = x.new_empty((p * x.shape[0],) + tuple(x.shape[1:]))
    all_gather_into(out, x, group)
    return out


def reduce_scatter_dim0(x, group):
    p = world_size(group)
    out = x.new_empty((x.shape[0] // p,) + tuple(x.shape[1:]))
    reduce_scatter_into(out, x, group)
    return out


def all_gather_last_dim(x, group):
    """Concatenate x over ranks along the last dimension."""
    p = world_size(group)
    if p == 1:
        return x
    x = x.contiguous()
    if x.dim() == 0:
        x = x.reshape(1)
    out = x.new_empty((p * x.shape[0],) + tuple(x.shape[1:]))
    all_gather_into(out, x, group)
    return torch.cat(out.view((p,) + tuple(x.shape)).unbind(0), dim=-1)


# ---- decomposed collectives ---------------------------------------------------------------------

def _exchange(send, recv, group, to_rank, from_rank, tag=0):
    ops = [dist.P2POp(dist.isend, send, global_rank(group, to_rank), group, tag),
           dist.P2POp(dist.irecv, recv, global_rank(group, from_rank), group, tag)]
    return dist.batch_isend_irecv(ops)


def _wait(works):
    for w in works or ():
        w.wait()


def ring_all_gather(x, group, compute=None, pieces=1):
    """All-gather of x [m, ...] along dim 0, decomposed into p ring steps: at step s every rank
    passes the chunk it holds on to rank+1 and receives the next one from rank-1, while
    ``compute(lo, hi, rows)`` runs on rows [lo, hi) of the gathered [p*m, ...] tensor that are
    already here (its own chunk first). With pieces > 1 every chunk travels as that many
    separate messages, so the compute on a chunk starts when its first piece arrives and each
    piece is forwarded as soon as it is here (a finer pipeline). Returns the gathered tensor."""
    p, r = world_size(group), rank(group)
    m = x.shape[0]
    full = x.new_empty((p * m,) + tuple(x.shape[1:]))
    full[r * m:(r + 1) * m].copy_(x)
    bounds = chunk_bounds(m, pieces)
    nxt, prv = (r + 1) % p, (r - 1) % p

    def post(t, k):  # step t, piece k: send chunk r-t's piece on, receive chunk r-t-1's piece
        lo, hi = bounds[k]
        j_send, j_recv = (r - t) % p, (r - t - 1) % p
        return _exchange(full[j_send * m + lo:j_send * m + hi], full[j_recv * m + lo:j_recv * m + hi],
                         group, nxt, prv, tag=k)

    pending = [post(0, k) for k in range(len(bounds))] if p > 1 else []
    if compute is not None:
        compute(r * m, (r + 1) * m, full[r * m:(r + 1) * m])
    for t in range(1, p):
        j = (r - t) % p
        posted = []
        for k, (lo, hi) in enumerate(bounds):
            _wait(pending[k])
            if t < p - 1:
                posted.append(post(t, k))
            if compute is not None:
                compute(j * m + lo, j * m + hi, full[j * m + lo:j * m + hi])
        pending = posted
    return full


def ring_reduce_scatter(group, m, partial, pieces=1):
    """Reduce-scatter along dim 0 of per-rank partial results of a [p*m, ...] tensor, decomposed
    into p ring steps.

    ``partial(lo, hi)`` returns this rank's contribution to rows [lo, hi) (a fresh tensor); it is
    called for chunks r-1, r-2, ..., r (mod p), each while the running sum of the previous chunk
    travels on. With pieces > 1 each chunk is computed and sent in that many pieces, so its
    first piece is on the wire while the rest computes. Returns the sum over ranks of chunk r
    ([m, ...])."""
    p, r = world_size(group), rank(group)
    bounds = chunk_bounds(m, pieces)
    nxt, prv = (r + 1) % p, (r - 1) % p
    pending = []  # per piece: (works, send buffer, receive buffer) of the previous step
    out = None
    for t in range(p):
        c = (r - 1 - t) % p
        posted = []
        for k, (lo, hi) in enumerate(bounds):
            part = partial(c * m + lo, c * m + hi).contiguous()  # it is sent as it is
            if t > 0:
                works, _, recv = pending[k]
                _wait(works)
                part.add_(recv)
            if t < p - 1:
                recv = part.new_empty(part.shape)
                posted.append((_exchange(part, recv, group, nxt, prv, tag=k), part, recv))
            else:
                if out is None:
                    out = part.new_empty((m,) + tuple(part.shape[1:]))
                out[lo:hi].copy_(part)
        pending = posted
    return out


def pieces_all_gather(x, group, compute=None, pieces=2):
    """Same contract as ring_all_gather, decomposed into `pieces` asynchronous all-gathers of row
    pieces (transport="collective"): the compute on this rank's chunk runs while they are in
    flight, then each piece's rows are computed as soon as that piece has arrived."""
    p, r = world_size(group), rank(group)
    m = x.shape[0]
    full = x.new_empty((p * m,) + tuple(x.shape[1:]))
    full[r * m:(r + 1) * m].copy_(x)
    bounds = chunk_bounds(m, pieces)
    posted = []
    for lo, hi in bounds:
        buf = x.new_empty((p * (hi - lo),) + tuple(x.shape[1:]))
        posted.append((buf, all_gather_into(buf, x[lo:hi], group, async_op=True)))
    if compute is not None:
        compute(r * m, (r + 1) * m, full[r * m:(r + 1) * m])
    for (lo, hi), (buf, work) in zip(bounds, posted):
        work.wait()
        n = hi - lo
        for j in range(p):
            if j == r:
                continue
            full[j * m + lo:j * m + hi].copy_(buf[j * n:(j + 1) * n])
            if compute is not None:
                compute(j * m + lo, j * m + hi, full[j * m + lo:j * m + hi])
    return full


def pieces_reduce_scatter(group, m, partial, pieces=2):
    """Same contract as ring_reduce_scatter, decomposed into `pieces` asynchronous
    reduce-scatters (transport="collective"): piece k (rows [lo, hi) of every rank's chunk) is
    reduced while the partials of piece k+1 compute."""
    p, r = world_size(group), rank(group)
    out, posted = None, []
    for lo, hi in chunk_bounds(m, pieces):
        n = hi - lo
        buf = None
        for c in range(p):
            part = partial(c * m + lo, c * m + hi)
            if buf is None:
                buf = part.new_empty((p * n,) + tuple(part.shape[1:]))
                if out is None:
                    out = part.new_empty((m,) + tuple(part.shape[1:]))
            buf[c * n:(c + 1) * n].copy_(part)
        posted.append((reduce_scatter_into(out[lo:hi], buf, group, async_op=True), buf))
    for work, _ in posted:
        work.wait()
    return out


def meets_only_here(group_a, group_b):
    """Whether two process groups share no rank but this one (they form a grid, e.g. tensor x context parallel)."""
    shared = set(dist.get_process_group_ranks(group_a)) & set(dist.get_process_group_ranks(group_b))
    return shared == {dist.get_rank()}


class SharesProcessGroups:
    """copy.deepcopy of this object keeps the torch.distributed process groups it refers to (a group cannot be
    copied, and the copy takes part in the same collectives, as DDP's copy does) and copies everything else:
    parallel models can be copied (an EMA or evaluation copy)."""

    def __deepcopy__(self, memo):
        for value in vars(self).values():
            if isinstance(value, dist.ProcessGroup):
                memo[id(value)] = value
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in vars(self).items():
            new.__dict__[name] = copy.deepcopy(value, memo)
        return new


class AsyncChunkAllReduce:
    """transport="collective" counterpart of PipelinedAllReduce: each chunk's all-reduce is the
    backend's own asynchronous all-reduce (same start/advance/finish interface). A tensor that is
    not contiguous (a strided view) is reduced in a contiguous copy that finish() writes back:
    the backends reduce the bytes of the storage, not the view's elements."""

    def __init__(self, group):
        self.group, self._works = group, []

    def start(self, t):
        if world_size(self.group) > 1:
            buf = t if t.is_contiguous() else t.contiguous()
            self._works.append((dist.all_reduce(buf, group=self.group, async_op=True), buf, t))

    def advance(self):
        pass

    def finish(self):
        for w, buf, t in self._works:
            w.wait()
            if buf is not t:
                t.copy_(buf)
        self._works = []


class PipelinedAllReduce:
    """All-reduces of token chunks made of point-to-point ring steps that the caller advances
    between its GEMM chunks, so each chunk's reduction runs under the following GEMMs:

        ar = PipelinedAllReduce(group)
        for lo, hi in chunks:
            gemm(rows lo:hi -> y[lo:hi]); ar.advance(); ar.start(y[lo:hi])
        ar.finish()

    p = 2: one exchange per chunk (send the partial, receive the peer's, add: the same bytes as a
    ring all-reduce). p > 2: ring reduce-scatter + all-gather, 2(p-1) steps per chunk, one step
    per advance(). The reduction (the add) runs on the caller's thread, not the backend's
    (gloo's own all-reduce reduces on its worker thread, which competes with the GEMM)."""

    def __init__(self, group):
        self.group = group
        self.p, self.r = world_size(group), rank(group)
        self._inflight = []
        self._count = 0

    def start(self, t):
        """Begin the all-reduce of the contiguous tensor t (in place)."""
        if self.p == 1:
            return
        if not t.is_contiguous() or t.numel() < self.p:
            all_reduce(t, self.group)  # (a strided view: through a contiguous copy)
            return
        gen = self._steps(t, tag=1 + self._count % 1024)
        self._count += 1
        if next(gen, StopIteration) is not StopIteration:
            self._inflight.append(gen)

    def advance(self):
        """One step of every all-reduce in flight (waits for the step's transfer)."""
        alive = []
        for gen in self._inflight:
            if next(gen, StopIteration) is not StopIteration:
                alive.append(gen)
        self._inflight = alive

    def finish(self):
        while self._inflight:
            self.advance()

    def _steps(self, t, tag):
        p, r, g = self.p, self.r, self.group
        nxt, prv = (r + 1) % p, (r - 1) % p
        if p == 2:
            recv = t.new_empty(t.shape)
            works = _exchange(t, recv, g, nxt, prv, tag)
            yield
            _wait(works)
            t.add_(recv)
            return
        flat = t.view(-1)
        segs = [flat[lo:hi] for lo, hi in chunk_bounds(flat.numel(), p)]
        for step in range(p - 1):  # reduce-scatter: rank r ends owning segment r+1
            s_send, s_recv = segs[(r - step) % p], segs[(r - step - 1) % p]
            recv = s_recv.new_empty(s_recv.shape)
            works = _exchange(s_send, recv, g, nxt, prv, tag)
            yield
            _wait(works)
            s_recv.add_(recv)
        for step in range(p - 1):  # all-gather of the reduced segments
            works = _exchange(segs[(r + 1 - step) % p], segs[(r - step) % p], g, nxt, prv, tag)
            yield
            _wait(works)


def chunk_bounds(n, chunks):
    """[(lo, hi)] splitting range(n) into at most `chunks` nearly equal non-empty pieces."""
    chunks = max(1, min(int(chunks), n)) if n > 0 else 1
    base, rem = divmod(n, chunks)
    out, lo = [], 0
    for i in range(chunks):
        hi = lo + base + (1 if i < rem else 0)
        out.append((lo, hi))
        lo = hi
    return out


def all_reduce(x, group, async_op=False):
    """In-place sum of x over the ranks. x need not be contiguous when async_op is False (a strided
    view is reduced in a contiguous copy, written back); an asynchronous one needs a contiguous x."""
    if not x.is_contiguous():
        if async_op:
            raise ValueError("comm.all_reduce: an asynchronous all-reduce needs a contiguous tensor (got "
                             f"shape {tuple(x.shape)} strides {x.stride()})")
        buf = x.contiguous()
        dist.all_reduce(buf, group=group)
        x.copy_(buf)
        return None
    return dist.all_reduce(x, group=group, async_op=async_op)
