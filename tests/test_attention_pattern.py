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
