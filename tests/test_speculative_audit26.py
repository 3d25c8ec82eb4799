"""Speculative sampling with transformers' sampling warpers (typical_p, epsilon_cutoff, eta_cutoff): the accepted
tokens follow the target's warped distribution exactly."""
import pytest
import torch

from llmkern.generation import generate
from llmkern.models import build
from test_speculative import _chi2, _exact_joint, _fits, _perturbed, _sharpen

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    EpsilonLogitsWarper, EtaLogitsWarper, TypicalLogitsWarper)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)


def test_speculative_sampling_with_warpers_matches_the_target_distribution():
    """Per-position statistics of speculative sampling with typical_p and eta_cutoff (then epsilon_cutoff) equal
    the target's exact distribution through transformers' own warpers (temperature first, as its generate), and
    are told apart from the unwarped one. The old generate refused these knobs with a draft_model."""
    Vs, N, T = 6, 3000, 4
    torch.manual_seed(0)
    target = _sharpen(build("llama-tiny", backend="torch", vocab_size=Vs, n_layer=1, block_size=16), 4)
    draft = _perturbed(target, 0.3, 1)
    prompt = torch.randint(0, Vs, (1, T), generator=torch.Generator().manual_seed(1))
    x = prompt.expand(N, T)
    temperature = 0.9
    cases = [(dict(typical_p=0.7, eta_cutoff=0.1), [TypicalLogitsWarper(0.7), EtaLogitsWarper(0.1, device="cpu")]),
             (dict(epsilon_cutoff=0.12), [EpsilonLogitsWarper(0.12)])]
    for seed, (knobs, warpers) in enumerate(cases):
        def process(logits, warpers=warpers):
            y = (logits / temperature).reshape(-1, Vs)
            for w in warpers:
                y = w(None, y)
            return torch.softmax(y, -1).reshape(logits.shape)

        joint12, p3 = _exact_joint(target, prompt, Vs, process)
        plain12, _ = _exact_joint(target, prompt, Vs, lambda y: torch.softmax(y / temperature, -1))
        out = generate(target, x, 3, draft_model=draft, num_draft_tokens=2, seed=7 + seed, return_dict=True,
                       strategy="sample", temperature=temperature, **knobs)
        new = out.sequences[:, T:]
        assert float(out.num_accepted_draft_tokens.sum()) > 0.3 * N  # the truncation path is exercised
        pair = new[:, 0] * Vs + new[:, 1]
        assert _fits(pair, joint12.flatten()), (knobs, _chi2(pair, joint12.flatten()))
        assert _fits(new[:, 2], p3), (knobs, _chi2(new[:, 2], p3))
        assert int((joint12 == 0).sum()) > int((plain12 == 0).sum())  # the warpers cut tokens here
        assert not _fits(pair, plain12.flatten())  # (the test tells the unwarped distribution apart)
