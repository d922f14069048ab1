"""SparsePattern: the allowed-pair count against a brute-force count of the mask definition."""
import itertools

import pytest

from megatron_ratplus.attention_pattern import SparsePattern


def brute_force_pairs(T, D, W, P):
    return sum(1 for t in range(T) for j in range(t + 1)
               if t - j <= W or j < P or (D > 0 and (j + 1) % D == 0))


@pytest.mark.parametrize("T,D,W,P", list(itertools.product(
    [0, 1, 7, 33, 130], [1, 2, 5, 16, -1], [0, 3, 64, 200], [0, 1, 6, 150])))
def test_allowed_pairs_matches_mask_definition(T, D, W, P):
    assert SparsePattern(D, W, P).allowed_pairs(T) == brute_force_pairs(T, D, W, P)


def test_dense_pattern_counts_every_causal_pair():
    assert SparsePattern(1, 0, 0).allowed_pairs(4096) == 4096 * 4097 // 2


def test_negative_length_rejected():
    with pytest.raises(ValueError, match="seq_len"):
        SparsePattern(64, 0, 0).allowed_pairs(-1)


def test_per_layer_lists_keep_integers_and_reject_fractions():
    import numpy as np

    from megatron_ratplus.attention_pattern import resolve_patterns
    patterns = resolve_patterns([64, np.int64(16)], [0, 256], 4, num_layers=2)
    assert patterns == (SparsePattern(64, 0, 4), SparsePattern(16, 256, 4))
    assert all(type(p.dilation) is int for p in patterns)
    # A fractional entry is named, not truncated to the integer below it.
    with pytest.raises(ValueError, match=r"dilation D must be an integer.*layer 1.*16\.7"):
        resolve_patterns([64, 16.7], 0, 0, num_layers=2)
    with pytest.raises(ValueError, match=r"local window W.*layer 0.*2\.5"):
        resolve_patterns(64, [2.5, 3], 0, num_layers=2)
    with pytest.raises(ValueError, match="length 3.*2 layers"):
        resolve_patterns([64, 16, 8], 0, 0, num_layers=2)
