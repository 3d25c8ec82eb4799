"""The "llmkern" attention implementation for Hugging Face transformers (AttentionInterface).

    import llmkern.integrations.transformers as lt
    lt.register()                                   # once per process
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="llmkern")
    # or: model.set_attn_implementation("llmkern")

`register()` installs two functions under the name "llmkern":
- a mask function (AttentionMaskInterface): instead of a [B, 1, Tq, Tk] tensor it returns the 2-D
  boolean key padding mask [B, Tk] (or None), after checking that the mask the model asked for
  is one the kernel expresses (causal, bidirectional, sliding window, with padding, at a query
  offset that is bottom-right aligned with the keys, as with DynamicCache or no cache; steps over a static
  cache: in eager mode a prefill or multi-token step's mask names the first slots the attention reads
  (_static_chunk_mask); a one-token step, and under torch.compile a multi-token step too, carries each row's
  key count for attention_with_kvcache (_static_step_mask). Packed sequences (position_ids
  restarting inside a row, as DataCollatorWithFlattening builds them) give the int64 sequence indices [B, T]
  instead, and the attention runs as llmkern.attention_varlen over the packed tokens. Anything else
  (chunked attention, custom or/and mask functions, a static cache's multi-token step under torch.compile
  with gradients or dropout) raises NotImplementedError.
- an attention function (AttentionInterface) mapping the model's call onto llmkern.attention:
  GQA natively (no repeat_kv), causal from the module (bottom-right aligned, so decode steps and
  chunked prefill with a cache need no special case), the mask's sliding window -> window (the mask
  function tags the tensor it returns with it, and returns a tensor whenever the window masks a key; the
  model's `sliding_window` argument, which some models omit or pass without a windowed mask, counts only
  for masks from elsewhere), `softcap`,
  `scaling` -> scale, `dropout` -> dropout_p (transformers passes the module's attention dropout in
  training mode and 0 in eval, so GPT-2's attn_pdrop trains as with eager/SDPA attention; the mask
  is llmkern's own, not torch's RNG stream), attention sinks (`s_aux`, gpt-oss's per-head
  `sinks` parameter; `sinks` as other models name it) -> sinks, trained through the kernels'
  backward. Position biases and 4-D masks raise a clear error.

The tags are Python attributes, which a copy of the mask does not carry (accelerate's device_map moving it to a
layer's device, activation offloading's copies for a checkpointed layer's recompute): the attention then takes them
from the live mask of ours with the copy's values (host reads, on that path only) or from the last mask of ours the
layer got, and otherwise raises rather than guess the kind from the module's flags (see _recovered).

Rows of padded queries (left padding) come out as zeros, where eager attention averages all
values (with sinks, eager gives about zero there too); real tokens get the same result.
"""
import weakref

import torch

import llmkern
from llmkern.ops import _checks

NAME = "llmkern"
# The masks _tag made, by their memory and layout (see _retagged); an entry lives as long as its mask.
_TAGGED = weakref.WeakValueDictionary()
# The names register() gave this attention (a layer whose config names one of them gets its masks from llmkern_mask).
_NAMES = set()
# The tags a mask of ours carries, which a copy of it (.to(), .clone(), a saved-tensor hook's copy) loses.
_TAG_NAMES = ("_llmkern_causal", "_llmkern_window", "_llmkern_fn_window", "_llmkern_all_visible", "_llmkern_keys",
              "_llmkern_lengths")


# ---- mask function ------------------------------------------------------------------------------

def _qualname(fn, default=""):
    """fn's qualified name, read from its code object where it has one: torch.compile traces that for any function
    (a module-level function's __qualname__ is a graph break), so the mask analysis below compiles, fullgraph too."""
    code = getattr(fn, "__code__", None)
    name = getattr(code, "co_qualname", None) if code is not None else None  # (Python 3.11+)
    return name if name is not None else getattr(fn, "__qualname__", default)


def _leaves(fn):
    """The elementary mask functions an and_masks(...) combination is made of. A function remapped to
    per-sequence positions (packed sequences) counts as the function it wraps: within one sequence
    positions rise by one per token, so causal / window masks on them are those on token indices."""
    qual = _qualname(fn)
    if qual.endswith("and_masks.<locals>.and_mask") and fn.__closure__:
        out = []
        for cell in fn.__closure__:
            fns = cell.cell_contents
            if isinstance(fns, tuple):
                for f in fns:
                    out.extend(_leaves(f))
        return out
    if qual.startswith("remap_positions_for_packed_sequence.") and fn.__closure__:
        inner = [c.cell_contents for c in fn.__closure__ if callable(c.cell_contents)]
        if len(inner) == 1:
            return _leaves(inner[0])
    return [fn]


def _packed_ids(leaf):
    """The [B, T] sequence-index tensor of transformers' packed_sequence_mask_function leaf, or None."""
    if not _qualname(leaf).startswith("packed_sequence_mask_function.") or not leaf.__closure__:
        return None
    ids = [c.cell_contents for c in leaf.__closure__ if isinstance(c.cell_contents, torch.Tensor)]
    return ids[0] if len(ids) == 1 else None


def _mask_window(mask_function):
    """The sliding window of the mask (transformers' sliding_window_overlay / sliding_window_bidirectional_overlay
    closure: kv > q - W, |q - kv| <= W), or None."""
    sizes = set()
    for f in _leaves(mask_function):
        name = _qualname(f)
        if name.startswith(("sliding_window_overlay.", "sliding_window_bidirectional_overlay.")):
            cells = [c.cell_contents for c in (f.__closure__ or ()) if isinstance(c.cell_contents, int)
                     and not isinstance(c.cell_contents, bool)]
            if len(cells) != 1:
                raise NotImplementedError(f"llmkern attention: cannot read the window size of {name!r}")
            sizes.add(cells[0])
    if len(sizes) > 1:
        raise NotImplementedError(f"llmkern attention: a mask with several sliding windows {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _window_binds(kind, window, q_offset, q_length, kv_offset, kv_length):
    """Whether the window masks any (query, key) pair of this call (tensor offsets: assume it does)."""
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        return True
    q_last, kv_last = q_offset + q_length - 1, kv_offset + kv_length - 1
    if kind == "causal":
        return q_last - kv_offset >= window
    return max(q_last - kv_offset, kv_last - q_offset) > window


def _tag(mask, window, kind):
    """The mask function's result, carrying the window its mask has and whether it is causal (see
    llmkern_attention_forward). Made contiguous first: generate's prepare_inputs_for_generation calls .contiguous()
    on the masks, and a copy of a sliced mask would not carry the tags."""
    if mask is not None:
        mask = mask.contiguous()
        if _has_memory(mask):
            other = _TAGGED.get(_layout(mask))
            if other is not None and other is not mask:  # (a view of another mask's memory: a copy, for _retagged to
                mask = mask.clone()                       # tell them apart, e.g. a full and a sliding-window mask)
            _TAGGED[_layout(mask)] = mask
        mask._llmkern_window = window
        mask._llmkern_causal = kind == "causal"
    return mask


def _origin(mask, fn_window, config):
    """`mask` (llmkern_mask's result) also carrying the window of its mask function, which llmkern_mask drops where it
    masks no key of this call (a copy's layer then still knows it is a sliding one, see _recovered), and the config it
    was built for (to tell several models' masks apart)."""
    if isinstance(mask, torch.Tensor):
        mask._llmkern_fn_window = fn_window
        if config is not None and _has_memory(mask):
            mask._llmkern_config_id = id(config)
    return mask


def _layout(t):
    """What a detached copy of `t` shares with it: its memory, layout, dtype and device."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device


def _has_memory(t):
    """Whether `t` has memory of its own for _layout to name: not traced (torch.compile), empty, meta or fake."""
    from torch._subclasses.fake_tensor import is_fake

    return not torch.compiler.is_compiling() and t.numel() > 0 and not t.is_meta and not is_fake(t)


def _retagged(mask):
    """The mask _tag made, for `mask` when it is a detached copy of it: reentrant gradient checkpointing recomputes a
    layer in the backward with .detach()ed tensor arguments, which carry no Python attributes, so a mask passed
    positionally (GPT-2, BERT, BART, Aimv2 call their layers so) reached the recompute untagged, and the module's
    is_causal / sliding_window took the place of the mask's kind and window (Aimv2's text tower: bidirectional
    recomputed attention, other gradients). A live tensor sharing a tagged mask's memory and layout holds its data,
    so its tags hold for it too."""
    if not isinstance(mask, torch.Tensor) or hasattr(mask, "_llmkern_causal") or not _has_memory(mask):
        return mask
    tagged = _TAGGED.get(_layout(mask))
    return mask if tagged is None else tagged


def _recovered(mask, module, is_causal=None, q_len=None, kv_len=None):
    """`mask` with its tags, when it is an untagged copy of a mask of ours: a copy carries no Python attributes, and
    the module's is_causal / sliding_window arguments, which then decided, are not always the mask's (Aimv2's text
    tower, OLMoE, Qwen2-MoE, PhiMoE: other results; a static cache's prefill: a key count error). accelerate's
    device_map copies the mask to each layer's device with .to(); activation offloading hands a checkpointed layer's
    recompute copies of its arguments. The tags are, in this order: those of the mask it is a detached view of
    (_retagged); of the live mask of ours with its values (_source: host reads, on this path only); the kind and
    window of the last mask of ours the layer got (_SEEN); else a clear error where the layer's config names this
    attention (the mask is then surely a copy of ours), and a mask from elsewhere is left to the module's arguments."""
    mask = _retagged(mask)
    if not isinstance(mask, torch.Tensor) or hasattr(mask, "_llmkern_causal") or not _has_memory(mask) \
            or mask.dim() != 2 or mask.dtype not in (torch.bool, torch.long):  # (not one of our masks' forms)
        return mask
    source = _source(mask, module, is_causal)
    if source is not None:
        return _tags_onto(mask, source)
    seen = _seen(module)
    if seen is not None and q_len is not None:
        return _layer_tags_onto(mask, seen, q_len, kv_len)
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if impl in _NAMES:
        raise NotImplementedError(
            "llmkern attention: the layer got an untagged copy of one of llmkern's attention masks (which carry their "
            "kind and window as Python attributes a copy loses, e.g. accelerate's device_map moving it to another "
            "device), and no live mask with its values; keep the model on one device, or use "
            "attn_implementation='sdpa'")
    return mask


def _layer_tags_onto(mask, seen, q_len, kv_len):
    """`mask` tagged with the kind and mask function's window `seen` of the layer's last mask of ours (a checkpointed
    layer's recompute: the forward's mask is gone by then), the window and the padding mask as llmkern_mask decides
    them for this call's queries and keys (bottom-right aligned, as without a cache): the recompute's kernel call is
    then the forward's, which torch.utils.checkpoint checks."""
    causal, fn_window = seen
    kind = "causal" if causal else "bidirectional"
    window = fn_window
    if window is not None and not _window_binds(kind, window, kv_len - q_len, q_len, 0, kv_len):
        window = None
    mask._llmkern_causal, mask._llmkern_window, mask._llmkern_fn_window = causal, window, fn_window
    mask._llmkern_all_visible = window is None and bool(mask.all())
    return mask


def _source(mask, module, is_causal):
    """The live mask of ours that `mask` is a copy of, or None; a NotImplementedError where masks of several kinds
    have its values and the layer does not tell which it takes. Between a causal and a bidirectional one (an
    encoder-decoder's masks over the same padding) the module's is_causal decides."""
    sources = _live_sources(mask, module)
    flag = getattr(module, "is_causal", None) if is_causal is None else is_causal
    if len(sources) > 1 and flag is not None:
        sources = [s for s in sources if s._llmkern_causal == bool(flag)] or sources
    if len(sources) > 1:
        raise NotImplementedError(
            "llmkern attention: the layer got a copy of one of llmkern's attention masks (which carry their kind and "
            "window as Python attributes a copy loses, e.g. accelerate's device_map moving it to another device), and "
            "masks of several kinds have its values; keep the model on one device, or use attn_implementation='sdpa'")
    return sources[0] if sources else None


# The (causal, mask function's window) of the last mask of ours each layer got (see _recovered).
_SEEN = weakref.WeakKeyDictionary()


def _remember(module, mask):
    """Keeps the kind of the (tagged) mask `module` got, for a copy of it in its recompute (see _recovered)."""
    if not torch.compiler.is_compiling():
        try:
            _SEEN[module] = (mask._llmkern_causal, _fn_window(mask))
        except TypeError:  # (a module that cannot be weakly referenced: nothing to remember it by)
            pass


def _seen(module):
    """What _remember kept for `module`, or None."""
    try:
        return _SEEN.get(module)
    except TypeError:
        return None


def _fn_window(mask):
    """The window of a tagged mask's mask function (binding in this call or not)."""
    return getattr(mask, "_llmkern_fn_window", mask._llmkern_window)


def _live_sources(mask, module):
    """The live masks of ours with `mask`'s values, one per kind, that the layer may take (_fits_layer): those built
    for the layer's config where there are such. One host read per live mask of the same shape and dtype."""
    found = [other for other in list(_TAGGED.values())
             if other is not mask and other.shape == mask.shape and other.dtype == mask.dtype
             and hasattr(other, "_llmkern_causal") and torch.equal(other.to(mask.device), mask)]
    config_id = id(getattr(module, "config", None))
    mine = [other for other in found if getattr(other, "_llmkern_config_id", None) == config_id]
    kinds = {}
    for other in mine or found:
        if _fits_layer(module, other):
            kinds.setdefault(tuple(_tag_value(other, name) for name in _TAG_NAMES), other)
    return list(kinds.values())


def _tag_value(mask, name):
    """A tag, as a hashable value."""
    value = getattr(mask, name, None)
    return tuple(value.tolist()) if isinstance(value, torch.Tensor) else value


def _fits_layer(module, mask):
    """Whether the layer may take the tagged `mask`: its kind is the one of the last mask of ours the layer got, or
    (none yet) the layer's type in its config (transformers' layer_types pick each layer's mask by it). A full and a
    sliding-window mask over the same padding have the same values."""
    seen = _seen(module)
    if seen is not None:
        return seen == (mask._llmkern_causal, _fn_window(mask))
    types = getattr(getattr(module, "config", None), "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    if isinstance(types, (list, tuple)) and isinstance(idx, int) and 0 <= idx < len(types):
        if types[idx] == "full_attention":
            return _fn_window(mask) is None
        if types[idx] == "sliding_attention":
            return _fn_window(mask) is not None
    return True


def _tags_onto(mask, source):
    """`mask` carrying the tags of `source`, the mask of ours it is a copy of (a tensor tag moved to its device)."""
    for name in _TAG_NAMES:
        if hasattr(source, name):
            value = getattr(source, name)
            setattr(mask, name, value.to(mask.device) if isinstance(value, torch.Tensor) else value)
    return mask


def _mask_kind(mask_function):
    """(_classify, _mask_window, whether it has packed-sequence leaves) of a combined mask function: read from the
    closures' names and cells, which torch.compile traces (not taken as constants: the closures may hold tensors,
    e.g. transformers' packed-sequence indices), so a sliding-window model compiles with fullgraph=True."""
    return (_classify(mask_function), _mask_window(mask_function),
            any(_packed_ids(f) is not None for f in _leaves(mask_function)))


def _packed_list(mask_function):
    """The packed-sequence index tensors of the mask's leaves."""
    return [ids for ids in map(_packed_ids, _leaves(mask_function)) if ids is not None]


def _classify(mask_function):
    """'causal' / 'bidirectional' (possibly with a sliding window) or a NotImplementedError."""
    from transformers import masking_utils as mu

    kinds = set()
    for f in _leaves(mask_function):
        name = _qualname(f)
        if _packed_ids(f) is not None:
            kinds.add("packed")
        elif f is mu.causal_mask_function:
            kinds.add("causal")
        elif f is mu.bidirectional_mask_function:
            kinds.add("bidirectional")
        elif name.startswith("sliding_window_overlay.") or name.startswith("sliding_window_bidirectional_overlay."):
            kinds.add("window")
        else:
            raise NotImplementedError(
                f"llmkern attention cannot express the mask function {name or repr(f)!r} (chunked attention, block "
                f"or custom masks): it supports causal, bidirectional and sliding-window masks with key "
                f"padding or packed sequences. Use attn_implementation='sdpa' or 'eager' for this model/input.")
    kinds.discard("packed")
    if kinds >= {"causal", "bidirectional"}:
        raise NotImplementedError("llmkern attention: a mask both causal and bidirectional is not expressible")
    return "causal" if "causal" in kinds else "bidirectional"


def _check_mask_consumer(config):
    """Gemma 4 with KV-shared layers slices every mask as [B, 1, Tq, Tk] before those layers (for flash / flex
    only it does not); this interface's masks are [B, Tk] key masks: an IndexError in the model's code."""
    if getattr(config, "num_kv_shared_layers", 0) and str(getattr(config, "model_type", "")).startswith("gemma4"):
        raise NotImplementedError("llmkern attention: Gemma 4 with KV-shared layers (num_kv_shared_layers > 0) "
                                  "slices the attention masks as 4-D tensors, which llmkern's key masks are not; "
                                  "use attn_implementation='sdpa' for this model")


def llmkern_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, use_vmap=False, **kwargs):
    """AttentionMaskInterface entry: returns the bool key padding mask [B, kv_length] or None; for
    packed sequences (position_ids restarting inside a row, no padding mask, no cache) the int64
    sequence indices [B, T], which the attention function turns into varlen attention."""
    from transformers import masking_utils as mu

    config = kwargs.get("config")
    _check_mask_consumer(config)
    mask_function = mu.causal_mask_function if mask_function is None else mask_function
    if mask_function is mu.causal_mask_function:  # (the common case, decided without reading closures: traces,
        kind, window, has_packed = "causal", None, False  # so a compiled forward keeps one graph, fullgraph too)
    elif mask_function is mu.bidirectional_mask_function:
        kind, window, has_packed = "bidirectional", None, False
    else:
        kind, window, has_packed = _mask_kind(mask_function)
    packed = _packed_list(mask_function) if has_packed else []
    if packed:
        if attention_mask is not None or q_length != kv_length or len(packed) > 1:
            raise NotImplementedError("llmkern attention: packed sequences with a padding mask or a cache")
        return _origin(_tag(packed[0].to(torch.long, copy=True), window, kind), window, config)  # (ours to tag)
    fn_window = window
    if window is not None and not _window_binds(kind, window, q_offset, q_length, kv_offset, kv_length):
        window = None  # (every key is within the window: no need to carry a mask for it)
    if _built_here(attention_mask, kv_length, kind, window):
        return attention_mask
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    pad = None
    if attention_mask is not None:
        pad = mu.prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)
        pad = pad[:, kv_offset:kv_offset + kv_length]
    # Causal: keys after the last query (a static cache's unwritten tail) must be masked. Bidirectional masks
    # (encoders, an encoder-decoder's cross-attention: fewer queries than keys) see every key, as in eager.
    q_end = q_offset + q_length
    kv_end = kv_offset + kv_length
    if kind != "causal" and window is not None and (isinstance(q_end, torch.Tensor) or q_end != kv_end):
        raise NotImplementedError("llmkern attention: a bidirectional sliding window with queries not aligned "
                                  "with the keys is not expressible")
    if kind == "causal" and (isinstance(q_end, torch.Tensor) or q_end != kv_end):
        if q_length > 1 and not torch.compiler.is_compiling():
            return _origin(_static_chunk_mask(batch_size, q_offset, q_end, kv_offset, kv_end, kv_length, pad, window,
                                              device), fn_window, config)
        # (traced, a static cache's offset is a tensor: the first q_end slots cannot be sliced off without a host
        # read. A multi-token step then runs as a one-token step does, attention_with_kvcache with q_end keys per
        # row, which aligns the queries with the last of them; a mask alone would let them see their own future.)
        if q_length > 1 and not (isinstance(kv_offset, int) and kv_offset == 0):
            raise NotImplementedError(
                f"llmkern attention: causal queries against {kv_length} cached keys from position {kv_offset} are "
                f"not bottom-right aligned (a multi-token step over a static cache under torch.compile); use "
                f"DynamicCache, or 'sdpa' for this step")
        q_end_t = torch.as_tensor(q_end, device=device)
        valid = (torch.arange(kv_length, device=device) + kv_offset) < q_end_t
        valid = valid[None, :].expand(batch_size, kv_length)
        pad = valid if pad is None else (pad & valid)
        if isinstance(kv_offset, int) and kv_offset == 0:  # (every row's keys: the slots before q_end)
            lengths = q_end_t.to(torch.int32).reshape(1).expand(batch_size).contiguous()
            return _origin(_static_step_mask(pad, window, lengths), fn_window, config)
    all_visible = pad is None or (window is None and not torch.compiler.is_compiling() and bool(pad.all()))
    if all_visible and window is None and kind == "causal":
        # nothing to hide in a causal mask: None, as SDPA gets (the module's is_causal decides; a model that
        # concatenates this mask with another, T5Gemma2's merged self + cross attention, fails on None loudly)
        return None
    if pad is None:  # a bidirectional or windowed mask carries its kind and window to the attention
        pad = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    pad = _tag(pad, window, kind)
    pad._llmkern_all_visible = all_visible  # (the attention then passes no padding mask to the kernel)
    return _origin(pad, fn_window, config)


def _built_here(mask, kv_length, kind, window):
    """Whether `mask` is this function's result for the same keys, handed back to it: generate builds a static
    cache's masks before the forward, and some models (Mistral) build theirs again from the one they are given.
    To them a 2-D mask is a padding mask over every position, which ours is not: cut to the cache's window
    already, cutting it again by the window's offset hid the newest keys."""
    return (isinstance(mask, torch.Tensor) and hasattr(mask, "_llmkern_causal") and mask.shape[-1] == kv_length
            and mask._llmkern_causal == (kind == "causal") and mask._llmkern_window == window)


def _static_step_mask(pad, window, lengths):
    """A one-token step over a static cache, or under torch.compile a multi-token one (no host read: it compiles and
    captures): the padding mask over the cache's slots, hiding those past the last query, plus each row's key count
    (_llmkern_lengths, int32 [B]), with which an inference call runs attention_with_kvcache: its split-K kernel then
    reads only the keys written so far, not every slot of the cache, and aligns the queries with the last of them.
    A multi-token step needs that call (the mask alone would show each query the chunk's later keys)."""
    pad = _tag(pad, window, "causal")
    pad._llmkern_all_visible = False
    pad._llmkern_lengths = lengths
    return pad


def _static_chunk_mask(batch_size, q_offset, q_end, kv_offset, kv_end, kv_length, pad, window, device):
    """Several causal queries over a cache holding more slots than keys written so far (a static cache's prefill,
    or a multi-token step over it, in eager mode): the keys the queries may see are the first q_end - kv_offset
    slots, so the attention reads only those (the mask carries their count, _llmkern_keys) and the queries are
    bottom-right aligned with them. One host read of the query offset (the mask checked it before anyway); under
    torch.compile such a step is refused (single-token decode steps take the masked path, with no host read)."""
    limit = int(q_end)
    if not isinstance(kv_offset, int) or not kv_offset < limit <= kv_end:
        # (queries past the last slot: the cache is full, and every implementation fails; say so, not "use sdpa")
        hint = (f"the static cache is too short for them (max_cache_len {kv_end})" if isinstance(kv_offset, int)
                and limit > kv_end else "use DynamicCache, or 'sdpa' for this step")
        raise NotImplementedError(
            f"llmkern attention: causal queries at positions {int(q_offset)}..{limit - 1} against {kv_length} cached "
            f"keys from position {kv_offset} are not bottom-right aligned with any prefix of them; {hint}")
    n = limit - kv_offset
    pad = torch.ones(batch_size, n, dtype=torch.bool, device=device) if pad is None else pad[:, :n]
    all_visible = window is None and bool(pad.all())
    pad = _tag(pad, window, "causal")
    pad._llmkern_all_visible = all_visible
    pad._llmkern_keys = n
    return pad


# ---- attention function -------------------------------------------------------------------------

def llmkern_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """AttentionInterface entry. query [B, H, Tq, D], key [B, Hk, Tk, D], value [B, Hk, Tk, Dv] ->
    ([B, Tq, H, Dv], None). Dv may differ from D (DeepSeek-V2/V3's MLA: 192 / 128): value is taken as it
    is, unpadded (transformers pads it to D only for flash-attention)."""
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("llmkern attention does not support additive position biases")
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    if kwargs.get("output_attentions", False):
        raise NotImplementedError("llmkern attention does not return attention weights "
                                  "(output_attentions=True needs attn_implementation='eager')")
    attention_mask = _recovered(attention_mask, module, is_causal, query.shape[2], key.shape[2])
    if isinstance(attention_mask, torch.Tensor) and hasattr(attention_mask, "_llmkern_causal"):
        _remember(module, attention_mask)
        # eager and SDPA attend by the mask, whose kind the mask function knew: some models build a causal mask
        # for modules whose is_causal is False (Aimv2's text tower, Gemma with use_bidirectional_attention)
        is_causal = attention_mask._llmkern_causal
    elif is_causal is None:  # no mask of ours (none: SDPA's rule, the module's flag)
        is_causal = getattr(module, "is_causal", True)
    kpm = None
    window = None
    # The window is the mask's, when the mask is llmkern_mask's (None, or a tensor it tagged): eager and SDPA
    # attend by the mask alone, and models do not always pass a `sliding_window` argument that agrees with
    # it (Qwen2-MoE with use_sliding_window and PhiMoE build a sliding-window mask but pass none; OLMoE passes
    # config.sliding_window with a full causal mask). The argument is used for a mask from elsewhere only.
    if attention_mask is None:
        sliding_window = None
    elif isinstance(attention_mask, torch.Tensor) and hasattr(attention_mask, "_llmkern_window"):
        sliding_window = attention_mask._llmkern_window
    if sliding_window is not None and sliding_window > 0:
        # HF masks: causal kv > q - sw (left = sw - 1); bidirectional |q - kv| <= sw
        window = (sliding_window - 1, None) if is_causal else (sliding_window, sliding_window)
    if value.dtype != query.dtype:
        value = value.to(query.dtype)
    if key.dtype != query.dtype:
        key = key.to(query.dtype)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.dtype == torch.long:
        return _packed_attention(query, key, value, attention_mask, bool(is_causal), scaling, window, softcap,
                                 dropout, sinks), None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
                or attention_mask.dtype != torch.bool:
            desc = (f"{attention_mask.dim()}-D {attention_mask.dtype} tensor"
                    if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__)
            raise NotImplementedError(
                f"llmkern attention got an attention_mask that is a {desc}: it takes the 2-D key padding "
                f"mask built by its own mask function (llmkern.integrations.transformers.register()); "
                f"custom 4-D masks need attn_implementation='sdpa' or 'eager'")
        kpm = None if _all_visible(attention_mask, window) else attention_mask
        n = getattr(attention_mask, "_llmkern_keys", None)
        if n is not None:  # (a static cache's chunk: the first n slots hold every key it sees; see llmkern_mask)
            key, value = key[:, :, :n], value[:, :, :n]
        if attention_mask.shape[-1] != key.shape[2]:
            raise NotImplementedError(f"llmkern attention: key padding mask covers {attention_mask.shape[-1]} keys, "
                                      f"the layer has {key.shape[2]}")
    lengths = getattr(attention_mask, "_llmkern_lengths", None)
    if lengths is not None:
        if is_causal and not dropout and not _checks.wants_grad(query, key, value, sinks):
            # (a static cache's step: the keys written so far only; attention_with_kvcache is inference-only)
            out = llmkern.attention_with_kvcache(query, key, value, lengths, causal=True, scale=scaling,
                                                 window=window, softcap=softcap if softcap else None,
                                                 key_padding_mask=kpm, sinks=sinks)
            return out.transpose(1, 2).contiguous(), None
        if query.shape[2] > 1:  # (the dense kernel would align the queries with the cache's last slot)
            raise NotImplementedError(
                "llmkern attention: a multi-token step over a static cache under torch.compile runs for inference "
                "only (no gradients, no dropout); use DynamicCache, eager mode, or 'sdpa' for this step")
    out = llmkern.attention(query, key, value, causal=bool(is_causal), scale=scaling, window=window,
                            softcap=softcap if softcap else None, key_padding_mask=kpm,
                            dropout_p=float(dropout) if dropout else 0.0, sinks=sinks)
    return out.transpose(1, 2).contiguous(), None


def _all_visible(mask, window):
    """Whether the 2-D bool mask hides no key, so that the kernel gets none: the mask function's flag, or for a mask
    that lost its tags its rule again. Activation offloading (save_on_cpu) hands a checkpointed layer's recompute
    copies of its tensor arguments, which _retagged cannot find: an all-visible mask BERT and BART pass positionally
    then went to the kernel in the recompute only, and torch.utils.checkpoint refused the recomputed activations
    (other shapes than the forward's)."""
    if hasattr(mask, "_llmkern_causal"):
        return getattr(mask, "_llmkern_all_visible", False)
    return window is None and not torch.compiler.is_compiling() and bool(mask.all())


def _packed_attention(query, key, value, seq_ids, causal, scale, window, softcap, dropout, sinks=None):
    """Packed sequences (padding-free batches, e.g. DataCollatorWithFlattening): every run of equal sequence indices
    in a row is one sequence (llmkern.ops.attention.attention_segments: attention_varlen over the runs, traced too;
    transformers gives the indices to every traced forward with no padding mask and no cache). Returns [B, T, H, Dv]."""
    from llmkern.ops.attention import attention_segments

    B, H, T, _ = query.shape
    if seq_ids.shape != (B, T) or key.shape[2] != T:
        raise NotImplementedError(f"llmkern attention: packed sequence indices {tuple(seq_ids.shape)} do not "
                                  f"match the layer's {B} rows of {T} queries and {key.shape[2]} keys")
    return attention_segments(query, key, value, seq_ids, causal=causal, scale=scale, window=window,
                              softcap=softcap if softcap else None, dropout_p=float(dropout) if dropout else 0.0,
                              sinks=sinks)


def check_name(name):
    """ValueError unless `name` is a non-empty str (what attn_implementation / experts_implementation take)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str (the attn_implementation / experts_implementation to "
                         f"register), got {name!r}")


def register(name: str = NAME):
    """Register `name` ("llmkern") with transformers' AttentionInterface and AttentionMaskInterface."""
    check_name(name)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, llmkern_attention_forward)
    AttentionMaskInterface.register(name, llmkern_mask)
    _NAMES.add(name)
    return name


__all__ = ["register", "llmkern_attention_forward", "llmkern_mask", "NAME"]
