"""The CPU sampler defect (vLLM #55005) and our fix.

The unit tests show the defect is present in the installed vLLM (its CPU stand-in for
``expand_kernel`` returns garbage for float tensors) and that the replacement is exact.  The
engine test compares per-position token distributions with and without speculation: with the
defect, sampled speculative output is garbage and this test fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.cpu_fixes import _version_tuple, defect_present, expand_batch_to_tokens_fixed


def test_fixed_expand_repeats_values_and_keeps_dtype():
    x = torch.tensor([0.7, 0.0, 1.2], dtype=torch.float32)
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = expand_batch_to_tokens_fixed(x, cu, 6, replace_from=0, replace_to=1)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.2])
    ints = expand_batch_to_tokens_fixed(torch.tensor([5, 7]), torch.tensor([1, 3]), 3)
    assert ints.tolist() == [5, 7, 7]


def test_version_parsing():
    assert _version_tuple("0.32.0") == (0, 32, 0)
    assert _version_tuple("0.27.1+cpu") == (0, 27, 1)
    assert _version_tuple("1.0") == (1, 0, 0)


@pytest.mark.skipif(not defect_present(), reason="only the affected CPU builds carry the defect")
def test_installed_cpu_stand_in_is_defective():
    """Documents why the fix exists: vLLM's own CPU path corrupts float expansions."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    current_platform.register_triton_kernel_overrides()
    original = rejection_sampler._expand
    x = torch.tensor([0.7, 0.3, 1.2], dtype=torch.float32)
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = torch.full((6,), -1.0)
    original(out, x, cu, 0, 1)
    assert not torch.allclose(out, torch.tensor([0.7, 0.7, 0.3, 0.3, 0.3, 1.2]))


def _position_tokens(engine, k: int, samples: int, length: int) -> np.ndarray:
    rows = []
    prompt = "List three colours."
    while len(rows) < samples:
        rollout = engine.run(prompt, n=16, k=k, max_tokens=length, ignore_eos=True)
        for branch in rollout.branches:
            ids = engine.tokenizer.encode(branch.text, add_special_tokens=False)
            if len(ids) >= length:
                rows.append(ids[:length])
    return np.asarray(rows[:samples])


def _total_variation(a: np.ndarray, b: np.ndarray) -> float:
    values = np.union1d(a, b)
    pa = np.array([(a == v).mean() for v in values])
    pb = np.array([(b == v).mean() for v in values])
    return 0.5 * float(np.abs(pa - pb).sum())


@pytest.mark.engine
def test_sampled_speculation_matches_plain_sampling(draft_engine):
    """Per-position permutation test: speculative (k=4) vs plain (k=0) token distributions."""
    samples, length, permutations = 160, 6, 300
    plain = _position_tokens(draft_engine, 0, samples, length)
    spec = _position_tokens(draft_engine, 4, samples, length)
    rng = np.random.default_rng(0)
    both = np.concatenate([plain, spec])
    for pos in range(1, length):  # position 0 comes from prefill, before any speculation
        observed = _total_variation(plain[:, pos], spec[:, pos])
        null = []
        for _ in range(permutations):
            perm = rng.permutation(len(both))
            null.append(_total_variation(both[perm[:samples], pos], both[perm[samples:], pos]))
        p_value = (1 + sum(v >= observed for v in null)) / (1 + permutations)
        # Bonferroni over positions at 1%: garbage output gives p ~ 1/permutations.
        assert p_value > 0.01 / (length - 1), f"position {pos}: TV={observed:.3f}, p={p_value:.4f}"
