"""LoRA modules: LoRALinear (an nn.Linear plus a low-rank update on the fused op) and inject_lora.

    W = W0 + scaling · B A,   A [r, in] kaiming-uniform, B [out, r] zeros (PEFT init),
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
    DoRA (use_dora=True): W = (m / ‖W0 + scaling · B A‖_row) ⊙ (W0 + scaling · B A), magnitude m [out]
    initialised to the row norms of W0 (PEFT init); see llmkern.peft.dora.
    QLoRA: the base layer may be a frozen 4-bit llmkern.peft.NF4Linear (see llmkern.peft.qlora).
    GPT-2: the base layer may be transformers' Conv1D (weight stored [in, out], PEFT's fan_in_fan_out).
    Adapter dtype: A, B (and DoRA's magnitude) are float32 over a float16 / bfloat16 base by default, as PEFT keeps
    them (autocast_adapter_dtype=True); ``adapter_dtype=`` changes that (see LoRALinear).
    Init: ``init_lora_weights=`` True (the above), False, "gaussian", "pissa", "pissa_niter_K", "olora": PEFT's
    LoraConfig(init_lora_weights=...), drawn as PEFT draws them (one seed, the same factors); PiSSA and OLoRA rewrite
    the base weight to W0 - scaling · B0 A0 (see LoRALinear).
"""
import itertools
import math
import re
import sys
from typing import List, Sequence, Union

import torch
from torch import nn

from llmkern.ops.lora import lora_linear
from llmkern.peft._plain_lora import (  # noqa: F401 (re-exported)
    PlainLoRA,
    check_adapter_dtype,
    check_lora_args,
    has_forward_hooks,
    is_hf_conv1d,
    linear_features,
    lora_scaling,
    resolve_adapter_dtype,
)
from llmkern.peft.dora import dora_linear, dora_weight_norm
from llmkern.peft.qlora import NF4Linear, nf4_dora_linear

MAX_RANK = 256  # the largest r a LoRALinear takes

# PEFT's init_lora_weights values LoRALinear takes; PiSSA and OLoRA start A, B from the base weight and rewrite it to
# W0 - s·B0 A0 (the layer starts as the base layer), the others leave the base weight alone
_PLAIN_INITS = ("gaussian",)
_BASE_CHANGING_PREFIXES = ("pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def check_init_lora_weights(init_lora_weights):
    """init_lora_weights normalised (True, False, "gaussian", "pissa", "pissa_niter_K", "olora"; strings lower-cased),
    or ValueError naming the argument (PEFT's other inits, e.g. "loftq", "corda", "eva", are refused by name)."""
    if isinstance(init_lora_weights, bool):
        return init_lora_weights
    name = init_lora_weights.lower() if isinstance(init_lora_weights, str) else None
    if name in _PLAIN_INITS + ("pissa", "olora") or (name is not None and _PISSA_NITER.fullmatch(name)):
        return name
    raise ValueError(f"init_lora_weights must be True (A kaiming-uniform, B zeros), False (both kaiming-uniform: a "
                     f"non-identity adapter), \"gaussian\", \"pissa\", \"pissa_niter_K\" (K a non-negative int) or "
                     f"\"olora\"; got {init_lora_weights!r} (PEFT's other initialisations are not supported by "
                     f"llmkern.peft)")


def is_base_changing_init(init_lora_weights) -> bool:
    """Whether init_lora_weights (normalised) rewrites the base weight: PiSSA, OLoRA."""
    return isinstance(init_lora_weights, str) and init_lora_weights.startswith(_BASE_CHANGING_PREFIXES)


def check_base_changing_init(base_layer, r, scaling, init):
    """ValueError naming init_lora_weights (or r, alpha) when PiSSA / OLoRA cannot start from `base_layer`'s weight:
    a 4-bit one (W - s·B A cannot be stored in it), one on the meta device (nothing to decompose), r above the
    weight's rank bound min(in, out), or for PiSSA a scaling <= 0 (its factors are √(S / s))."""
    if isinstance(base_layer, NF4Linear):
        raise ValueError(f"init_lora_weights={init!r} rewrites the base weight to W - s·B A, which a 4-bit "
                         f"NF4Linear cannot hold without re-quantizing; initialise on the dense model, then "
                         f"quantize_nf4 it (PiSSA's residual quantizes with less error), or use "
                         f"init_lora_weights=True")
    if any(t.is_meta for t in itertools.chain(base_layer.parameters(), base_layer.buffers())):
        raise ValueError(f"init_lora_weights={init!r} starts A, B from the base weight, which is on the meta "
                         f"device (offloaded by accelerate, or not materialised yet); add the adapter once the "
                         f"weights are loaded")
    n_in, n_out = linear_features(base_layer)
    if r > min(n_in, n_out):
        raise ValueError(f"init_lora_weights={init!r}: r={r} exceeds min(in_features, out_features) = "
                         f"{min(n_in, n_out)}, the rank of the base weight's "
                         f"{'SVD' if init.startswith('pissa') else 'QR'}; pass a smaller r")
    if init.startswith("pissa") and not scaling > 0:
        raise ValueError(f"init_lora_weights={init!r} splits the singular values by the scaling "
                         f"(alpha / r = {scaling}), which must be positive: pass alpha > 0")


class LoRALinear(PlainLoRA):
    """An ``nn.Linear`` with a LoRA update computed by ``llmkern.lora_linear`` (one fused op).

    The wrapped layer is kept as ``base_layer`` (PEFT's name) and frozen; ``lora_A`` ``[r, in]`` and
    ``lora_B`` ``[out, r]`` are the trainable parameters. ``merge()`` folds ``scaling · B A`` into
    the base weight (checking the result is finite), ``unmerge()`` takes it out again.

    ``adapter_dtype``: the dtype of A, B and DoRA's magnitude. None (default, PEFT's ``autocast_adapter_dtype=True``):
    float32 over a float16 / bfloat16 base (for a 4-bit base: its compute dtype), so that small optimizer updates
    are not rounded away, else the base dtype (float32, float64); ``"base"``: the base dtype (PEFT's
    ``autocast_adapter_dtype=False``); or a torch dtype. The forward computes in the input's dtype: the fused op
    casts A and B to it (autograd casts their gradients back, so float32 factors get float32 gradients of the
    16-bit products). merge() / unmerge() compute W ± s·B·A in float32 and round once into the weight.
    ``adapter_dtype`` (the property) is the dtype they have now; ``set_adapter_dtype`` casts them in place.

    QLoRA: ``base_layer`` may be a frozen 4-bit ``NF4Linear`` (``quantized`` is then True). A and B default to
    float32 (PEFT's LoRA on bitsandbytes 4-bit layers is float32 too), the forward hands its ``NF4Weight`` to
    ``lora_linear`` (the kernels read W in 4 bits) and the input must have the compute dtype (or run under
    autocast), as with a dense base. ``weight`` is then
    that NF4Weight. ``merge()`` raises: W + s·B·A cannot be stored in 4 bits without re-quantizing it (a
    new rounding error, and no exact unmerge); ``merged_linear()`` (what ``merge_lora(model, remove=True)``
    puts in the layer's place) returns a dense ``nn.Linear`` of dequant(W) + s·B·A instead. DoRA works: its
    row norms are computed from the dequantized weight (a temporary per call, see nf4_dora_linear).

    ``use_dora=True``: DoRA (``llmkern.peft.dora_linear``, PEFT's semantics): a third trainable parameter
    ``lora_magnitude_vector`` ``[out]`` (PEFT's name), initialised to the row norms of the base weight, and
    ``y = (m / ‖W + s B A‖_row) ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b`` with the norm detached and never forming B A.
    ``merge()`` writes ``(m / ‖W + s B A‖_row) ⊙ (W + s B A)`` into the weight and keeps the norm it used,
    so that ``unmerge()`` can divide it out again (as PEFT does).

    GPT-2: ``base_layer`` may be transformers' ``Conv1D`` (``y = x W + b``, W stored ``[in, out]``; PEFT wraps it
    with ``fan_in_fan_out=True``). A and B keep nn.Linear's shapes; ``weight`` is the ``[out, in]`` transposed view
    of the Conv1D's parameter, which the fused op reads in place (no copy; its gradient reaches the parameter), and
    through which merge / unmerge / DoRA read and write it. The state dict keeps ``base_layer.weight`` in the Conv1D
    layout (PEFT's), and ``merge_lora(model, remove=True)`` puts the (merged) Conv1D back.

    ``disabled = True`` runs the base layer alone (PEFT's disable_adapters); a merged layer is unmerged by its
    next forward, as PEFT does, so the output is the base model's.

    The state, merge / unmerge and state-dict bookkeeping are PlainLoRA's (shared with LoRAEmbedding and LoRAConv);
    this class adds the fused forward, DoRA (the magnitude, ``_dora_merge`` / ``_dora_unmerge``) and the 4-bit base.

    ``init_lora_weights`` (PEFT's LoraConfig field, same semantics; the draws are PEFT's too: its A and B start as
    ``nn.Linear`` layers built in float32 on the CPU (two kaiming-uniform draws), then its init runs and the factors
    pass through the base weight's dtype; so one seed gives PEFT's factors): True (default): A kaiming-uniform, B
    zeros; False: A and B both kaiming-uniform (a non-identity adapter, for tests); "gaussian": A normal with std
    1/r, B zeros; "pissa": from the base weight's SVD W = U S Vᵀ, A = √(S_r/s) V_rᵀ, B = U_r √(S_r/s) (the top r
    singular triplets, s the scaling), and the base weight becomes the residual W - s·B A; "pissa_niter_K": the same
    with ``torch.svd_lowrank(W, q=r, niter=K)`` (randomised: the seed picks it, as in PEFT); "olora": W = Q R, A =
    R[:r], B = Q[:, :r], the base weight becomes W - s·B A. For the last three the layer starts as the base layer,
    up to rounding; they need a dense, materialised base weight (a 4-bit base or one on the meta device raises
    ValueError), r <= min(in, out), and PiSSA a positive scaling (alpha > 0). The SVD / QR run in float32 (float64
    for a float64 weight; PEFT refuses float64). A Conv1D base is read as its [out, in] view for both (PEFT's OLoRA
    reads a Conv1D's weight untransposed). A base weight shared with another module (tied embeddings) would change
    there too: inject_lora refuses that; a LoRALinear built directly cannot see it. DoRA works on top (its
    magnitude starts as the rows of W - s·B A + s·B A = W).
    The initial factors of PiSSA / OLoRA are kept as the non-persistent buffers ``lora_A_init`` / ``lora_B_init``
    (r·(in + out) values in the adapter dtype: as much memory as A and B, with no gradient nor optimizer state;
    not in the state dict): save_peft_adapter(convert_to_original_base=True) needs them to write the adapter
    relative to the original base weight, and reset_lora_parameters() restores them (the base weight stays the
    residual). Setting them to None frees them (a later conversion then raises).
    """
    _supports_dora = True

    def __init__(self, base_layer: Union[nn.Linear, NF4Linear, nn.Module], r: int = 8, alpha: float = 8.0,
                 dropout: float = 0.0, use_rslora: bool = False, freeze_base: bool = True, use_dora: bool = False,
                 adapter_dtype: Union[None, str, torch.dtype] = None, init_lora_weights: Union[bool, str] = True):
        if not isinstance(base_layer, (nn.Linear, NF4Linear)) and not is_hf_conv1d(base_layer):
            raise TypeError(f"base_layer must be an nn.Linear, an llmkern.peft.NF4Linear or a transformers Conv1D, "
                            f"got {type(base_layer).__name__}")
        init_lora_weights = check_init_lora_weights(init_lora_weights)
        super().__init__(base_layer, r, alpha, dropout, use_rslora, use_dora, "linear", MAX_RANK, adapter_dtype)
        self.in_features, self.out_features = linear_features(base_layer)
        self.init_lora_weights = init_lora_weights
        dev, dt = self.weight.device, self._factor_dtype
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, device=dev, dtype=dt))
        self.register_parameter("lora_magnitude_vector", None)
        # PiSSA / OLoRA: the factors the base weight was rewritten with (save_peft_adapter's conversion needs them)
        self.register_buffer("lora_A_init", None, persistent=False)
        self.register_buffer("lora_B_init", None, persistent=False)
        self._finish_init(freeze_base)

    def _lora_factors(self):
        return self.lora_A, self.lora_B

    def _adapter_params(self):
        return [self.lora_A, self.lora_B, self.lora_magnitude_vector]

    @property
    def quantized(self) -> bool:
        """Whether the base layer is a 4-bit NF4Linear (QLoRA)."""
        return isinstance(self.base_layer, NF4Linear)

    @property
    def conv1d(self) -> bool:
        """Whether the base layer is transformers' Conv1D (GPT-2; weight stored [in, out])."""
        return is_hf_conv1d(self.base_layer)

    @property
    def weight(self):
        """The base weight as lora_linear takes it, [out, in]: a tensor (for a Conv1D base the transposed view of its
        [in, out] parameter: in-place writes to it write the parameter), or for a 4-bit base its NF4Weight."""
        if self.quantized:
            return self.base_layer.nf4_weight()
        return self.base_layer.weight.t() if self.conv1d else self.base_layer.weight

    def _base_dtype(self):
        return self.base_layer.compute_dtype if self.quantized else self.base_layer.weight.dtype

    def _dense_weight(self):
        """The base weight as a dense tensor (a 4-bit one dequantized into a temporary, no autograd)."""
        if self.quantized:
            return self.base_layer.nf4_weight().dequantize()
        return self.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def reset_lora_parameters(self):
        """Initialise A and B by ``init_lora_weights`` (see the class docstring; True, PEFT's default: A
        kaiming-uniform(a=√5) like nn.Linear, B zeros, so ΔW = 0); with DoRA the magnitude is the row norms of
        W + s·B A (so the layer starts as the base layer). PiSSA / OLoRA rewrite the base weight once: a later
        call puts the initial factors back (lora_A_init / lora_B_init) and leaves the residual weight as it is."""
        init = self.init_lora_weights
        if is_base_changing_init(init) and self.lora_A_init is not None:
            A, B = self.lora_A_init, self.lora_B_init
        else:
            if is_base_changing_init(init):
                self._check_base_changing_init()  # (before the first draw: a refusal changes nothing)
            A, B = self._peft_draws()
            if init is True:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r)
            if init is True or init == "gaussian":
                nn.init.zeros_(B)
            elif is_base_changing_init(init):
                A, B = self._rewrite_base(init)
            A, B = self._through_base_dtype(A), self._through_base_dtype(B)
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
        if is_base_changing_init(init) and self.lora_A_init is None:
            self.lora_A_init = self.lora_A.detach().clone()
            self.lora_B_init = self.lora_B.detach().clone()
        if self.use_dora:
            self._init_magnitude()

    def _peft_draws(self):
        """(A, B) as PEFT's layer holds them before its init runs: nn.Linear(in, r) and nn.Linear(r, out) built in
        that order in the default dtype on the CPU (kaiming-uniform(a=√5) each), so that one seed gives PEFT's
        factors (its True / "gaussian" inits draw A again, "pissa_niter_K" draws after these)."""
        A, B = torch.empty(self.r, self.in_features), torch.empty(self.out_features, self.r)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        return A, B

    def _through_base_dtype(self, t):
        """t rounded to the dense base weight's dtype, as PEFT moves new factors to the base layer's dtype before
        autocast_adapter_dtype casts them back to float32 (a 4-bit base: unchanged, PEFT skips integer dtypes)."""
        return t if self.quantized else t.to(self._base_dtype())

    def _check_base_changing_init(self):
        check_base_changing_init(self.base_layer, self.r, self.scaling, self.init_lora_weights)

    @torch.no_grad()
    def _rewrite_base(self, init):
        """PiSSA / OLoRA: (A, B) from the base weight W ([out, in]; a Conv1D's view), in float32 (float64 for a
        float64 weight), and W rewritten in place to the residual W - s·B A (PEFT's order of operations)."""
        W = self._dense_weight().detach().to(self._acc_dtype())
        r, s = self.r, self.scaling
        if init == "olora":
            Q, R = torch.linalg.qr(W)
            A, B = R[:r].contiguous(), Q[:, :r].contiguous()
        else:
            niter = _PISSA_NITER.fullmatch(init)
            if niter is None:
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:  # (randomised: draws from the generator, as PEFT's call does)
                U, S, V = torch.svd_lowrank(W, q=r, niter=int(niter.group(1)))
                Vh = V.t()
            root = torch.sqrt(S / s)  # (s split evenly between A and B, so that s·B A is the rank-r part of W)
            A, B = root[:, None] * Vh, U * root[None, :]
        self.weight.copy_((W - (s * B) @ A).to(self.weight.dtype))
        return A, B

    def _base_on_meta(self) -> bool:
        """Whether the base layer holds tensors on the meta device (offloaded by accelerate, or not materialised)."""
        return any(t.is_meta for t in itertools.chain(self.base_layer.parameters(), self.base_layer.buffers()))

    def _init_magnitude(self):
        if self._base_on_meta():
            raise ValueError("use_dora=True: DoRA's magnitude starts as the row norms of the base weight, which is on "
                             "the meta device (offloaded by accelerate, or not materialised yet); add DoRA before "
                             "offloading, or once the weights are loaded")
        m = self.dora_weight_norm().to(self.adapter_dtype)  # (float32 norms: exact in a float32 magnitude)
        if self.lora_magnitude_vector is None:
            self.lora_magnitude_vector = nn.Parameter(m)
        else:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(m)

    def set_use_dora(self, use_dora: bool):
        """Switch DoRA on (a new magnitude, initialised to the current ‖W + s B A‖ rows so that the
        output does not change) or off (the magnitude is dropped). Not while merged."""
        if self.merged:
            raise ValueError("set_use_dora: the module is merged; unmerge() it first")
        use_dora = bool(use_dora)
        if use_dora and self.lora_magnitude_vector is None:
            self._init_magnitude()  # (first: when it raises, the layer is still plain LoRA)
            self.use_dora = True
        elif not use_dora:
            self.lora_magnitude_vector = None
            self.use_dora = False

    def dora_weight_norm(self) -> torch.Tensor:
        """‖W + scaling · B A‖₂ per output row, [out], float32 (float64 for float64 weights), detached;
        computed without forming B A (llmkern.peft.dora_weight_norm). Only meaningful unmerged."""
        return dora_weight_norm(self._dense_weight(), self.lora_A, self.lora_B, self.scaling)

    def _delta(self):
        dt = self._acc_dtype()
        return self.scaling * (self.lora_B.to(dt) @ self.lora_A.to(dt))

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, [out, in], computed in float32 (float64 for float64 weights) and returned
        in the weight's dtype. (With DoRA too, as PEFT's get_delta_weight: the magnitude rescaling is
        not part of it.)"""
        return self._delta().to(self._base_dtype())

    def _dora_merge(self, new, safe_merge, what):
        """DoRA: (m / n) ⊙ new row-wise with n = ‖W + s B A‖_row, and n (PEFT's merge); new as it is otherwise."""
        if not self.use_dora:
            return new, None
        norm = self.dora_weight_norm()
        factor = self.lora_magnitude_vector.to(norm.dtype) / norm
        if safe_merge and not bool((factor != 0).all()):
            raise ValueError(f"{what}: lora_magnitude_vector has zero entries (or the ratio underflows): "
                             "unmerge() could not restore those rows; weight left unchanged")
        return factor.to(new.dtype)[:, None] * new, norm

    def _dora_unmerge(self, w):
        """PEFT's DoRA unmerge: W_merged / (m / n), n as merge() computed it (then unmerge() subtracts s B A)."""
        if not self.use_dora:
            return w
        factor = self.lora_magnitude_vector.to(self._dora_merged_norm.dtype) / self._dora_merged_norm
        return w / factor.to(w.dtype)[:, None]

    def merge(self, safe_merge: bool = True):
        """Fold the update into the base weight: after this, forward is a plain linear.

        DoRA: the weight becomes ``(m / n) ⊙ (W + s B A)`` row-wise with ``n = ‖W + s B A‖_row`` (PEFT's
        merge); n is kept for unmerge(). With ``safe_merge`` a non-finite result, or a zero magnitude
        entry (its merged row would be 0 and unmerge() could not give W back), raises and leaves the
        weight unchanged. A 4-bit base raises ValueError (see the class docstring; ``merged_linear()``)."""
        if self.quantized and not self.merged:
            raise ValueError("merge: the base layer is 4-bit (NF4Linear); W + s·B·A cannot be stored in it without "
                             "re-quantizing. Use merge_lora(model, remove=True) (or layer.merged_linear()), which "
                             "gives a dense nn.Linear of dequantized W + s·B·A (quantize_nf4 it again if wanted)")
        super().merge(safe_merge)

    @torch.no_grad()
    def merged_linear(self, safe_merge: bool = True) -> nn.Module:
        """A new dense, frozen ``nn.Linear`` computing what this layer computes (the merged weight as merge()
        forms it, the base bias), in the base dtype; this layer is unchanged. For a 4-bit base W is the
        dequantized weight, so the dense layer computes what this one does, up to rounding. For a Conv1D base it
        is a new Conv1D (the layer type the model was built with, weight [in, out]), as merge_lora(remove=True)
        leaves it."""
        w = self.weight.detach() if self.merged else self._merged_weight(safe_merge, "merged_linear")[0]
        if self.conv1d:
            dense = type(self.base_layer)(self.out_features, self.in_features).to(w.device, self._base_dtype())
            if self.bias is None:
                dense.bias = None
            dense.weight.t().copy_(w)
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                              dtype=self._base_dtype())
            dense.weight.copy_(w)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x)
        p = self.dropout if self.training else 0.0
        if has_forward_hooks(self.base_layer) or self._custom_base_forward():
            return self._forward_through_base(x, p)
        if self.quantized:
            return self._forward_nf4(x, p)
        if self.use_dora:  # (a Conv1D's weight goes in as its transposed view: the op reads it in place)
            return dora_linear(x, self.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                               self.lora_magnitude_vector, self.scaling, p)
        return lora_linear(x, self.weight, self.base_layer.bias, self.lora_A, self.lora_B, self.scaling, p)

    def _custom_base_forward(self) -> bool:
        """Whether the base layer is an nn.Linear subclass with a forward of its own (transformers' FalconLinear, a
        router returning (scores, logits)...): the fused op would compute F.linear(x, W, b) in its place."""
        return isinstance(self.base_layer, nn.Linear) and type(self.base_layer).forward is not nn.Linear.forward

    def _forward_through_base(self, x, p):
        """base_layer(x) + the update, unfused, as PEFT computes it: the base layer's own forward must run. It has
        forward hooks (a user's hook that records activations, or accelerate's offload (cpu_offload, device_map with
        offloading), which keeps its weight on the meta device and loads it only inside base_layer's own forward, so
        the fused op, which reads the weight, cannot run), or is an nn.Linear subclass with its own forward."""
        if self.use_dora:
            return self._dora_through_base(x, p)
        result = self._base_output(x)  # (first, as PEFT: the dropout mask is drawn after the base layer's hooks ran)
        h = nn.functional.dropout(x, p, training=p > 0)
        A, B = self.lora_A.to(h.dtype), self.lora_B.to(h.dtype)  # (the input's dtype, as the fused op computes)
        return result + self.scaling * nn.functional.linear(nn.functional.linear(h, A), B)

    def _dora_through_base(self, x, p):
        """DoRA around a hooked base layer, PEFT's formula: base_layer(x) + (m/n - 1) ⊙ (base term) + (m/n) ⊙ s·(x̃ Aᵀ)
        Bᵀ, the base term being base_layer(x) less its bias without dropout, x̃ Wᵀ with it. The row norms n need the
        weight outside the base layer's forward: an offloaded (meta) weight is refused."""
        if self._base_on_meta():
            raise NotImplementedError("LoRALinear with DoRA needs the base weight's row norms; its base layer has "
                                      "forward hooks (accelerate offloading?) that load the weight only inside its "
                                      "own forward: run it without offloading, or through PEFT")
        result = self._base_output(x)  # (first, as PEFT: the dropout mask is drawn after the base layer's hooks ran)
        h = nn.functional.dropout(x, p, training=p > 0)
        A, B = self.lora_A.to(h.dtype), self.lora_B.to(h.dtype)
        W = self._dense_weight()
        norm = dora_weight_norm(W, A, B, self.scaling)  # (float32, float64 for a float64 weight; detached)
        scale = (self.lora_magnitude_vector.to(norm.dtype) / norm).to(h.dtype)
        if p > 0:
            base = nn.functional.linear(h, W.to(h.dtype))
        else:
            base = result if self.bias is None else result - self.bias
        lora = self.scaling * nn.functional.linear(nn.functional.linear(h, A), B)
        return (result + (scale - 1) * base + scale * lora).to(result.dtype)

    def _base_output(self, x):
        """base_layer(x), which the update is added to, checked to be a [..., out_features] tensor (a router's
        (scores, logits) tuple raised a bare TypeError, a layer with extra output features a broadcasting error)."""
        result = self.base_layer(x)
        if not isinstance(result, torch.Tensor) or result.shape[-1:] != (self.out_features,):
            got = (f"a tensor of shape {tuple(result.shape)}" if isinstance(result, torch.Tensor)
                   else f"a {type(result).__name__}")
            raise TypeError(f"LoRALinear: the base layer ({type(self.base_layer).__name__}) returned {got}; LoRA adds "
                            f"its update to a [..., {self.out_features}] tensor output, so this layer cannot take a "
                            f"LoRA (leave it out of target_modules)")
        return result

    def _forward_nf4(self, x, p):
        base = self.base_layer
        base.check_input(x)
        if self.use_dora:
            return nf4_dora_linear(x, base.nf4_weight(), base.bias, self.lora_A, self.lora_B,
                                   self.lora_magnitude_vector, self.scaling, p)
        return lora_linear(x, base.nf4_weight(), base.bias, self.lora_A, self.lora_B, self.scaling, p)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, rslora={self.use_rslora}, "
                + ("dora=True, " if self.use_dora else "")
                + (f"init_lora_weights={self.init_lora_weights!r}, " if self.init_lora_weights is not True else "")
                + (f"adapter_dtype={self.adapter_dtype}, " if self.adapter_dtype != self._base_dtype() else "")
                + ("nf4=True, " if self.quantized else "")
                + ("conv1d=True, " if self.conv1d else "")
                + f"merged={self.merged}")


def _matches(name: str, targets: Union[str, Sequence[str]]) -> bool:
    """PEFT's rule: a string is a full regex match on the module name; a list matches names that
    equal an entry or end with '.' + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


ALL_LINEAR = "all-linear"  # PEFT's shorthand target (LoraConfig(target_modules="all-linear"))


def _is_all_linear(targets) -> bool:
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR  # (PEFT lower-cases it too)


def _wrappable(module) -> bool:
    """Whether inject_lora has a LoRA layer for `module`."""
    from llmkern.peft.lora_conv import CONV_TYPES

    return isinstance(module, (nn.Linear, NF4Linear, nn.Embedding) + CONV_TYPES) or is_hf_conv1d(module)


def _adapted(model):
    """ids of the model's llmkern LoRA layers and of every module inside them: already adapted, never a new target
    (PEFT leaves its own layers' insides alone too)."""
    from llmkern.peft.lora_conv import LoRAConv
    from llmkern.peft.lora_embedding import LoRAEmbedding

    return {id(sub) for m in model.modules() if isinstance(m, (LoRALinear, LoRAEmbedding, LoRAConv))
            for sub in m.modules()}


def _output_layer_names(model):
    """Names of the layers "all-linear" leaves out as the model's output layer: a transformers model's output
    embedding (get_output_embeddings(), PEFT's rule), a zoo model's lm_head (that of the HF model it maps to)."""
    hf = getattr(model, "hf_module_names", None)
    if callable(hf):
        return {n for n, h in hf().items() if h.name == "lm_head"}
    pretrained = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    out = model.get_output_embeddings() if pretrained is not None and isinstance(model, pretrained) else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def _all_linear_names(model, adapted):
    """PEFT's "all-linear": every nn.Linear (an NF4Linear too, as PEFT takes bitsandbytes' 4-bit layers) and
    transformers Conv1D but the output layer. A zoo model takes only the layers its transformers twin has
    (hf_module_names(): a Mixtral router is no nn.Linear there), so that both get the same adapter. The out_proj
    of an nn.MultiheadAttention is left out: MHA never calls it (see _read_in_place)."""
    skip = _output_layer_names(model) | set(_read_in_place(model, [n for n, _ in model.named_modules()]))
    hf = getattr(model, "hf_module_names", None)
    keep = set(hf()) if callable(hf) else None
    return [n for n, m in model.named_modules()
            if (isinstance(m, (nn.Linear, NF4Linear)) or is_hf_conv1d(m)) and id(m) not in adapted
            and n not in skip and (keep is None or n in keep)]


def _target_names(model, targets):
    """The names of the modules inject_lora wraps: the layers LoRA takes among the matches of `targets`. A regex
    (a string) or "all-linear" passes over the rest (".*" matches every block too). A list entry must name a layer
    LoRA takes, as in PEFT: a match of another type (a block, a norm, a tensor-parallel layer) raises, naming it,
    unless the entry is a suffix that also named layers LoRA takes (["1"] in an nn.Sequential: a ReLU at index 1
    elsewhere is passed over). Layers that already carry LoRA are passed over either way."""
    adapted = _adapted(model)
    if _is_all_linear(targets):
        return _all_linear_names(model, adapted)
    matched = [(n, m) for n, m in model.named_modules() if id(m) not in adapted and _matches(n, targets)]
    if not isinstance(targets, str):
        for t in targets:
            hits = [(n, m) for n, m in matched if _matches(n, [t])]
            suffix_ok = any(_wrappable(m) for _, m in hits)
            bad = [(n, m) for n, m in hits if not _wrappable(m) and (n == t or not suffix_ok)]
            if bad:
                _refuse_target(targets, *bad[0])
    return [n for n, m in matched if _wrappable(m)]


def _refuse_target(targets, name, module):
    hint = (" (a tensor-parallel layer: inject_lora before tensor_parallelize)"
            if type(module).__name__ in ("ColumnParallelLinear", "RowParallelLinear") else "")
    raise ValueError(f"inject_lora: target_modules {targets!r} matched {name or 'the model itself'}, a "
                     f"{type(module).__name__}, which LoRA cannot wrap{hint}; LoRA takes nn.Linear, NF4Linear, "
                     f"transformers Conv1D, nn.Embedding and nn.Conv1d/2d/3d layers: name those (or pass a regex "
                     f"string, which skips what it cannot wrap)")


def _tie_fused_parts(model, names):
    """all-linear on a zoo model: the zoo layers that are row blocks of one transformers layer (GPT-2's c_attn:
    q/k/v; Phi-3's qkv_proj, gate_up_proj) share one A Parameter, as PEFT's one LoRA on that layer has one A (the
    same parameters, gradients and saved adapter as PEFT's all-linear on the transformers model)."""
    from llmkern.peft.checkpoint import _tie_lora_a

    hf = getattr(model, "hf_module_names", None)
    groups = {}
    for zn, h in (hf() if callable(hf) else {}).items():
        if h.rows is not None:
            groups.setdefault(h.name, []).append(zn)
    for parts in groups.values():
        if all(zn in names for zn in parts):
            _tie_lora_a(model, sorted(parts, key=names.index))


def inject_lora(model: nn.Module, target_modules: Union[str, Sequence[str]] = ("q_proj", "v_proj"),
                r: int = 8, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False,
                freeze_base: bool = True, use_dora: bool = False,
                adapter_dtype: Union[None, str, torch.dtype] = None,
                init_lora_weights: Union[bool, str] = True) -> List[str]:
    """Replace every ``nn.Linear`` (or 4-bit ``NF4Linear``: QLoRA, see quantize_nf4; or transformers' GPT-2
    ``Conv1D``, weight [in, out], as PEFT's fan_in_fan_out) whose name matches ``target_modules`` by a
    ``LoRALinear`` (``use_dora=True``: DoRA ones, with a trainable magnitude vector per layer), every matching
    ``nn.Embedding`` (e.g. "embed_tokens", "wte") by a ``LoRAEmbedding`` (PEFT's LoRA on embeddings) and every
    matching ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` by a ``LoRAConv`` (PEFT's LoRA on convs);
    ``use_dora=True`` with an embedding or conv target raises ValueError.

    ``target_modules`` as in PEFT: a list of names (a module matches an entry it equals or ends with after a
    "."; a match LoRA cannot wrap, e.g. a block or a norm, raises ValueError naming it, as in PEFT, unless the entry
    is a suffix that also matched layers LoRA takes: ["1"] in nn.Sequential models skips a ReLU at index 1), a
    regex string (full match; matches LoRA cannot wrap are skipped: ".*" matches every block), or
    ``"all-linear"``: every nn.Linear / NF4Linear /
    Conv1D but the output layer (a transformers model's get_output_embeddings(), a zoo model's lm_head), the
    modules PEFT's ``LoraConfig(target_modules="all-linear")`` picks. On a zoo model that means the layers its
    transformers twin has (``hf_module_names()``), and the layers that are one transformers layer there (GPT-2's
    c_attn: q/k/v) share one A, PEFT's single A for it. Layers that already carry LoRA are skipped.

    ``adapter_dtype``: the dtype of the new LoRA parameters (A, B, DoRA magnitudes, embedding and conv factors).
    None (default): PEFT's ``autocast_adapter_dtype=True``: float32 for layers whose base is float16 / bfloat16
    (a 4-bit base: its compute dtype), else the base dtype; ``"base"``: each layer's base dtype (PEFT's
    ``autocast_adapter_dtype=False``); a torch dtype: that dtype. The forwards compute in the input's dtype.

    ``init_lora_weights``: PEFT's LoraConfig field (True, False, "gaussian", "pissa", "pissa_niter_K", "olora"; see
    LoRALinear), for the LoRALinear layers (embedding and conv targets take only True: ValueError otherwise; inject
    them in a separate call). The layers are built in the model's module order, as PEFT builds its own, so one seed
    gives PEFT's factors. PiSSA / OLoRA rewrite each target's base weight (W - s·B A): a target whose weight is shared
    with another module (tied embeddings) raises ValueError, as it would change there too; on a zoo model with
    "all-linear" the row blocks of one transformers layer (GPT-2's q/k/v) keep their own A then (each has its own
    decomposition), and save_peft_adapter needs ``convert_to_original_base`` for such an adapter.

    With ``freeze_base`` (default) every other parameter of the model is frozen too, so that only
    the LoRA parameters train (parameter-efficient ones the model already has, LoRA, DoRA magnitudes, adapters
    and prefixes, keep their state). Returns the names of the wrapped modules (raises if none matched).
    """
    from llmkern.peft.lora_conv import CONV_TYPES, LoRAConv
    from llmkern.peft.lora_embedding import LoRAEmbedding

    check_adapter_dtype(adapter_dtype)
    init_lora_weights = check_init_lora_weights(init_lora_weights)
    names = _target_names(model, target_modules)
    if "" in names:  # (the root: a LoRALinear would become a child of the very layer it wraps)
        raise ValueError(f"target_modules {target_modules!r} matched the model itself, an {type(model).__name__}; "
                         f"wrap a single layer directly: LoRALinear(layer, r=...)")
    mha = _read_in_place(model, names)
    if mha:
        raise ValueError(f"inject_lora: {mha[0]} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                         f"directly (F.multi_head_attention_forward), so a LoRA there would never run; leave it out "
                         f"of target_modules")
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear (or NF4Linear, transformers Conv1D, "
                         f"nn.Embedding, nn.Conv1d/2d/3d) in the model")
    embeddings = [n for n in names if isinstance(model.get_submodule(n), nn.Embedding)]
    if use_dora and embeddings:
        raise ValueError(f"inject_lora: use_dora=True is not supported on embedding layers ({embeddings[0]} is an "
                         f"nn.Embedding); leave it out of target_modules, or inject it in a separate call without "
                         f"use_dora")
    convs = [n for n in names if isinstance(model.get_submodule(n), CONV_TYPES)]
    if use_dora and convs:
        raise ValueError(f"inject_lora: use_dora=True is not supported on conv layers ({convs[0]} is an "
                         f"{type(model.get_submodule(convs[0])).__name__}); leave it out of target_modules, or "
                         f"inject it in a separate call without use_dora")
    if init_lora_weights is not True and (embeddings or convs):
        n = (embeddings + convs)[0]
        raise ValueError(f"inject_lora: init_lora_weights={init_lora_weights!r} is not supported on embedding or conv "
                         f"layers by llmkern.peft ({n} is an {type(model.get_submodule(n)).__name__}); leave it out "
                         f"of target_modules, or inject it in a separate call with init_lora_weights=True")
    base_changing = is_base_changing_init(init_lora_weights)
    # every wrapper built (its arguments checked) before the model changes: a refused call leaves it as it was.
    # (PiSSA / OLoRA rewrite each base weight as its wrapper is built: what a wrapper would refuse is checked for
    # all of them first, so that a refusal comes before the first rewrite; the per-layer checks before the tied
    # weights', which read a .weight that a 4-bit NF4Linear does not have)
    kw = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, freeze_base=False, adapter_dtype=adapter_dtype)
    if base_changing:
        check_lora_args(r, alpha, dropout, MAX_RANK)
        for n in names:
            check_base_changing_init(model.get_submodule(n), r, lora_scaling(alpha, r, use_rslora), init_lora_weights)
        _refuse_shared_base(model, names, init_lora_weights)
    new = [(n, LoRAEmbedding(model.get_submodule(n), **kw) if n in embeddings else
            LoRAConv(model.get_submodule(n), **kw) if n in convs else
            LoRALinear(model.get_submodule(n), use_dora=use_dora, init_lora_weights=init_lora_weights, **kw))
           for n in names]
    if freeze_base:
        _freeze_non_lora(model)  # (the wrapped layers' own parameters included)
    for n, layer in new:
        _set_submodule(model, n, layer)
    if _is_all_linear(target_modules) and not base_changing:  # (each PiSSA / OLoRA part has its own A)
        _tie_fused_parts(model, names)
    return names


def _read_in_place(model, names):
    """The names among `names` of nn.MultiheadAttention's out_proj (a Linear subclass whose forward MHA never calls)."""
    owners = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
              if isinstance(m, nn.MultiheadAttention)}
    return [n for n in names if n in owners]


def _freeze_non_lora(model: nn.Module):
    """requires_grad=False on every parameter except the model's parameter-efficient ones, which keep their state:
    the LoRA A/B weights (and DoRA magnitudes) of LoRALinear, LoRAEmbedding and LoRAConv modules, and Adapter /
    PrefixTuning parameters (an add_adapters or inject_lora call after another one must not freeze what the first one
    added)."""
    from llmkern.peft.adapter import Adapter
    from llmkern.peft.prefix import PrefixTuning

    # (tensor-parallel layers hold their LoRA shards as lora_A / lora_B parameters too, LoRAConv its conv factors)
    names = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
    keep = {id(p) for m in model.modules() for p in (getattr(m, n, None) for n in names)
            if isinstance(p, nn.Parameter)}
    keep |= {id(p) for m in model.modules() if isinstance(m, (Adapter, PrefixTuning)) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _tied_base_weights(model: nn.Module, mods):
    """{LoRALinear name: name of another parameter of `model` that is the same tensor as its base
    weight} (tied embeddings)."""
    return _shared_weights(model, {n: mod.base_layer for n, mod in mods})


def _shared_weights(model: nn.Module, layers):
    """{name: name of another parameter of `model` that is the same tensor as the weight of layers[name]}."""
    owners = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for pn, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((m, f"{n}.{pn}" if n else pn))
    tied = {}
    for n, layer in layers.items():
        others = [name for m, name in owners.get(id(layer.weight), []) if m is not layer]
        if others:
            tied[n] = others[0]
    return tied


def _refuse_shared_base(model, names, init):
    """PiSSA / OLoRA rewrite the base weight: one shared with another module (an lm_head tied to the token
    embedding) would change there too. ValueError naming init_lora_weights and the other owner."""
    tied = _shared_weights(model, {n: model.get_submodule(n) for n in names})
    if tied:
        n, owner = next(iter(tied.items()))
        raise ValueError(f"inject_lora: init_lora_weights={init!r} rewrites {n}'s base weight (W - s·B A), which is "
                         f"shared with {owner} (tied weights): that module would change too. Untie the weights "
                         f"first, leave {n} out of target_modules, or use init_lora_weights=True")


def lora_modules(model: nn.Module):
    """(name, LoRALinear) pairs of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_embedding_modules(model: nn.Module):
    """(name, LoRAEmbedding) pairs of a model (lora_modules lists the LoRALinear ones only)."""
    from llmkern.peft.lora_embedding import LoRAEmbedding

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAEmbedding)]


def lora_conv_modules(model: nn.Module):
    """(name, LoRAConv) pairs of a model (lora_modules lists the LoRALinear ones only: a LoRAConv's lora_A /
    lora_B are conv kernels, not [r, in] / [out, r] matrices)."""
    from llmkern.peft.lora_conv import LoRAConv

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAConv)]


def merge_lora(model: nn.Module, safe_merge: bool = True, remove: bool = False) -> nn.Module:
    """Merge every LoRALinear, LoRAEmbedding and LoRAConv; with ``remove`` put the plain nn.Linear /
    nn.Embedding / nn.Conv (a GPT-2 Conv1D: that Conv1D, merged in its [in, out] layout) back in its place. (A
    LoRAConv over a conv with groups > 1 cannot merge: ValueError, nothing merged.)

    Raises ValueError (nothing merged) when a base weight is shared with another module, e.g. an
    lm_head tied to the token embedding: merging would change that module too. LoRA layers over a 4-bit
    NF4Linear (QLoRA) cannot merge in place: without ``remove`` they raise ValueError (nothing merged);
    with ``remove`` each is replaced by ``merged_linear()``, a dense nn.Linear of dequantized W + s·B·A
    (all of them formed before the model is changed). A model that is itself a LoRA layer is merged; with
    ``remove`` its plain layer is returned."""
    mods = lora_modules(model)
    quantized = [(n, m) for n, m in mods if m.quantized]
    if quantized and not remove:
        raise ValueError(f"merge_lora: {quantized[0][0]} has a 4-bit base layer (NF4Linear) that cannot hold W + "
                         f"s·B·A; pass remove=True to replace such layers by dense nn.Linear layers of the merged "
                         f"weight (nothing merged)")
    others = lora_embedding_modules(model) + lora_conv_modules(model)  # (embeddings, convs: merge, _merged_weight)
    tied = _tied_base_weights(model, [(n, m) for n, m in mods + others if not m.merged and not m.quantized])
    if tied:
        n, owner = next(iter(tied.items()))
        raise ValueError(f"merge_lora: {n}'s weight is shared with {owner} (tied weights); merging would "
                         f"change {owner} too. Untie the weights first (or keep the adapter unmerged)")
    dense = {n: m.merged_linear(safe_merge=safe_merge) for n, m in quantized}
    # every merge checked before any is done, so that a refused call leaves the model as it was: with safe_merge each
    # merged weight is formed and checked; without, what refuses whatever the values still does (an offloaded weight,
    # a max_norm embedding, a grouped conv)
    for _, m in mods + others:
        if m.merged or m.quantized:
            continue
        if safe_merge:
            m._merged_weight(True)
        else:
            m._check_merge_possible("merge")
    for n, m in mods + others:
        if n not in dense:
            m.merge(safe_merge=safe_merge)
        if remove or n in dense:
            plain = dense.get(n, m.base_layer)
            if n:
                _set_submodule(model, n, plain)
            else:  # the model is itself a LoRA layer: no parent to put its plain layer in (setattr(model, "", ...)
                model = plain  # gave the LoRA layer a child named ""), so that layer is what is returned
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, m in lora_modules(model) + lora_embedding_modules(model) + lora_conv_modules(model):
        m.unmerge()
    return model


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
