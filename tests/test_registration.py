"""llmkern.ops.register_all() registers every torch.ops.llmkern.* custom op the package defines (the README tells
users to call it before torch.export.load in a fresh process; a hand-kept list of modules had left MoE's out)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _defined_ops():
    names = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "llmkern")):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(dirpath, f)).read()
                names |= set(re.findall(r'(?:custom_op|triton_op)\(\s*"llmkern::(\w+)"', text))
    return sorted(names)


def test_register_all_registers_every_custom_op():
    names = _defined_ops()
    assert "moe_mlp_fwd" in names and "attention_fwd" in names  # (the scan finds the ops)
    code = ("import torch, llmkern.ops\n"
            "llmkern.ops.register_all()\n"
            f"missing = [n for n in {names!r} if not hasattr(torch.ops.llmkern, n)]\n"
            "print(missing)\n")
    env = {k: v for k, v in os.environ.items() if k != "LLMKERN_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout


def test_star_import_gives_every_public_op():
    """`from llmkern import *` gave the eagerly imported sampling names only (no __all__; the other ops are lazy)."""
    import llmkern

    ns = {}
    exec("from llmkern import *", ns)
    for name in ("sample", "attention", "lora_linear", "rms_norm", "moe_mlp", "generate", "NF4Weight"):
        assert ns.get(name) is getattr(llmkern, name), name
    assert "models" not in ns and "_LAZY_ATTRS" not in ns
