"""Trainable-parameter formulas of the seed deck's PEFT slides (L layers, model width d).

    LoRA on W_Q and W_V (d x d):        2 · 2 · d · r · L
    Adapter (deck):                     2 · L · (r · d + r + d)
    Prefix-tuning, vanilla:             |P| · d · 2 · L
    Prefix-tuning, reparameterised:     |P| · d + d · H + H · d · 2 · L     (MLP d -> H -> 2Ld, no bias)

The modules in llmkern.peft count their own parameters; the tests check them against these.
The Adapter expression on the slide, 2·L·(r·d + r + d), counts both biases twice: one bottleneck
adapter (down d->r with bias r, up r->d with bias d) has 2·r·d + r + d parameters, so an adapter
per layer has L·(2rd + r + d) = deck − L·(r + d). `adapter_params` returns the slide's value and
`adapter_params_exact` the module's; they agree on the leading term 2·L·r·d.
"""
import numbers


def _counts(fn, *values, names):
    """The arguments as Python ints >= 0 (a negative or fractional count gave a meaningless number, a numpy int32
    wrapped in the products)."""
    for name, v in zip(names.split(), values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{fn}: {name} must be an int >= 0, got {v!r}")
    return [int(v) for v in values]


def lora_params(n_layers: int, d: int, r: int, n_matrices: int = 2, d_out: int = None) -> int:
    """Deck: 2 × 2 × d × r × L (LoRA on W_Q and W_V, each d x d). Generally n_matrices · r · (d + d_out) · L."""
    d_out = d if d_out is None else d_out
    n_layers, d, r, n_matrices, d_out = _counts("lora_params", n_layers, d, r, n_matrices, d_out,
                                                names="n_layers d r n_matrices d_out")
    return n_matrices * r * (d + d_out) * n_layers


def adapter_params(n_layers: int, d: int, r: int) -> int:
    """The seed deck's expression 2 × L × (r × d + r + d)."""
    n_layers, d, r = _counts("adapter_params", n_layers, d, r, names="n_layers d r")
    return 2 * n_layers * (r * d + r + d)


def adapter_params_exact(n_layers: int, d: int, r: int, sites_per_layer: int = 1) -> int:
    """What llmkern.peft.Adapter modules hold: (2·r·d + r + d) per adapter, per site, per layer."""
    n_layers, d, r, sites_per_layer = _counts("adapter_params_exact", n_layers, d, r, sites_per_layer,
                                              names="n_layers d r sites_per_layer")
    return sites_per_layer * n_layers * (2 * r * d + r + d)


def prefix_params(n_layers: int, d: int, n_prefix: int) -> int:
    """Deck, vanilla prefix-tuning: |P| × d × 2 × L."""
    n_layers, d, n_prefix = _counts("prefix_params", n_layers, d, n_prefix, names="n_layers d n_prefix")
    return n_prefix * d * 2 * n_layers


def prefix_params_reparam(n_layers: int, d: int, n_prefix: int, hidden: int) -> int:
    """Deck, reparameterised prefix-tuning: |P| × d + d × H + H × d × 2 × L."""
    n_layers, d, n_prefix, hidden = _counts("prefix_params_reparam", n_layers, d, n_prefix, hidden,
                                            names="n_layers d n_prefix hidden")
    return n_prefix * d + d * hidden + hidden * d * 2 * n_layers
