"""A low-overhead front for `triton.autotune`: tune once per key, then launch the JIT function directly.

Triton's Autotuner.run rebuilds a dict of every argument and filters it through a list on each call to
find its key; for the 56-argument dK/dV kernel that cost 39-73 µs per launch under Triton 3.6 and about
41 µs under 3.8 on the 2-core CI machine, against 14-20 µs through this front
(`tests/test_launch_overhead.py` measures both), before the JIT function's own launch work. An eager attention forward+backward makes three such launches, a LoRA layer six, so this
was a large part of the host time that bounded the H100's 1k-token attention and LoRA rows.

`Tuned(autotuner)[grid](*args, **kwargs)` computes the same key from the key arguments' positions
(found once) and the dtypes of the arguments that have one, exactly the autotuner's partition of calls.
A new key goes through the autotuner (which benchmarks, prunes and caches as usual) and its chosen
config is remembered; a known key runs the config's pre-hook and launches the JIT function with the
config's meta-parameters, which is what the autotuner itself does after its lookup.
"""
import os
import threading

import torch


def enabled():
    """LLMKERN_FAST_LAUNCH=0 sends every launch through the autotuner (for comparison)."""
    return os.environ.get("LLMKERN_FAST_LAUNCH", "1") != "0"


class Tuned:
    def __init__(self, autotuner):
        self.autotuner = autotuner
        self.fn = autotuner.fn
        self.arg_names = list(autotuner.arg_names)
        position = {name: i for i, name in enumerate(self.arg_names)}
        self._key_pos = [(name, position.get(name)) for name in autotuner.keys]
        self.chosen = {}  # key -> (triton.Config, its meta-parameters)
        # the first call of a key reads the autotuner's shared best_config after its launch (a compile: other
        # threads run meanwhile); serialised, so that a thread tuning another key cannot overwrite it in between
        self._first_call = threading.Lock()

    def key(self, args, kwargs):
        vals = [args[i] if i is not None and i < len(args) else kwargs.get(name) for name, i in self._key_pos]
        # the autotuner appends str(dtype) of every argument that has a dtype: among what our launchers
        # pass (tensors, numbers, strings, host tensor descriptors), the tensors
        vals += [a.dtype for a in args if isinstance(a, torch.Tensor)]
        vals += [v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor)]
        return tuple(vals)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args, kwargs):
        if not enabled():
            return self.autotuner[grid](*args, **kwargs)
        key = self.key(args, kwargs)
        chosen = self.chosen.get(key)
        if chosen is None:  # first call with this key: the autotuner tunes (or finds its cache) and launches
            with self._first_call:
                ret = self.autotuner[grid](*args, **kwargs)
                config = self.autotuner.best_config
                self.chosen[key] = (config, config.all_kwargs())
            return ret
        config, meta = chosen
        if config.pre_hook is not None:
            nargs = dict(zip(self.arg_names, args))
            nargs.update(kwargs)
            nargs.update(meta)
            config.pre_hook(nargs)
        return self.fn.run(*args, grid=grid, warmup=False, **kwargs, **meta)
