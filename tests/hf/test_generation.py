"""generate() with the compact RAT+ cache against greedy decoding by full recomputation."""
import pytest
import torch

from megatron_ratplus.hf import RATPlusCache, compact_cache_entries

from .helpers import small_model, tokens

PATTERNS = {
    "D4W2P1": dict(dilation=4, local_window=2, initial_tokens=1),
    "D3W0P0": dict(dilation=3, local_window=0, initial_tokens=0),       # W = 0: only chunk ends + self
    "D5W0P3": dict(dilation=5, local_window=0, initial_tokens=3),       # W = 0 with sink tokens
    "local": dict(dilation=-1, local_window=4, initial_tokens=2),       # D = -1: window + sinks only
    "localW0": dict(dilation=-1, local_window=0, initial_tokens=1),
    "hybrid": dict(dilation=[6, 1], local_window=[3, 0], initial_tokens=[0, 2]),   # layer 2 dense
}


def greedy_by_recomputation(model, ids, steps):
    x = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat((x, nxt), dim=1)
    return x


@pytest.mark.parametrize("mode,overrides", [("dense", {})] + [("sparse", p) for p in PATTERNS.values()],
                         ids=["dense"] + list(PATTERNS))
@pytest.mark.parametrize("recurrence", [True, False], ids=["rat", "attn"])
def test_generate_equals_greedy_recomputation(mode, overrides, recurrence):
    # Smaller init than the logits tests: a flatter softmax over the vocabulary keeps greedy choices
    # far from ties, and the generated text is not a constant.
    model = small_model(seed=3, recurrence=recurrence, attention_mode=mode, initializer_range=0.15, **overrides)
    ids = tokens(2, 9, seed=4)
    steps = 24
    want = greedy_by_recomputation(model, ids, steps)
    got = model.generate(ids, max_new_tokens=steps, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, want)
    assert len(set(got[:, 9:].flatten().tolist())) > 1        # not a constant continuation


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cache_size_equals_formula(name):
    overrides = PATTERNS[name]
    model = small_model(attention_mode="sparse", **overrides)
    ids = tokens(1, 7)
    out = model.generate(ids, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, RATPlusCache)
    T = cache.get_seq_length()
    assert T == 7 + 40 - 1                           # the last generated token is never fed back
    c = model.config
    d = c.hidden_size
    expected = 0
    for i, layer in enumerate(cache.layers):
        D, W, P = c.layer_pattern(i)
        # brute force: the union of the three sets of positions
        union = {j for j in range(T) if j < P or j >= T - W - 1 or (D > 1 and (j + 1) % D == 0)}
        if D == 1:
            union = set(range(T))
        assert layer.num_entries() == len(union) == compact_cache_entries(T, None if D == 1 else (D, W, P))
        stored = sorted(int(p) for p in layer.positions if p >= 0)
        assert stored == sorted(union)               # exactly these positions, each once
        expected += len(union)
    size = cache.size()
    assert size["entries"] == expected
    assert size["kv_bytes"] == expected * 2 * d * 4              # key + value, fp32, batch 1
    assert size["state_bytes"] == c.num_hidden_layers * 2 * d * 4
    assert size["allocated_bytes"] >= size["kv_bytes"] + size["state_bytes"]


def test_compact_cache_entries_formula_brute_force():
    for D, W, P in [(4, 2, 1), (3, 0, 0), (5, 0, 3), (-1, 4, 2), (16, 256, 4), (64, 0, 0), (7, 10, 9), (4, 1, 3)]:
        for T in list(range(0, 40)) + [300, 1000]:
            union = {j for j in range(T) if j < P or j >= T - W - 1 or (D > 0 and (j + 1) % D == 0)}
            assert compact_cache_entries(T, (D, W, P)) == len(union), (D, W, P, T)


@pytest.mark.parametrize("pattern", [(4, 2, 1), (3, 0, 0), (5, 0, 3), (-1, 4, 2), (7, 10, 9), (2, 3, 40),
                                     (4, 100, 2), (3, 55, 5),
                                     (2, 3, 1), (4, 1, 3)])     # a chunk end at j = P leaves the ring
def test_single_token_insert_matches_chunked_insert(pattern):
    """The decoding fast path (one token, slots decided on the host) lays the cache out exactly as
    the general insertion does for any mix of chunks and single tokens."""
    from megatron_ratplus.hf.modeling_ratplus import RATPlusLayerCache

    T = 61
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, T, 4, generator=gen)
    v = torch.randn(2, 3, T, 4, generator=gen)
    whole = RATPlusLayerCache(pattern)
    whole.insert(k, v)
    for pieces in ([1] * T, [7] + [1] * 20 + [13] + [1] * 21):
        cache, start = RATPlusLayerCache(pattern), 0
        for n in pieces:
            cache.insert(k[:, :, start:start + n], v[:, :, start:start + n])
            start += n
        assert start == T and cache.seen == T and cache.used == whole.used
        for got, want in zip(cache.view(), whole.view()):
            assert torch.equal(got, want)
        assert cache.num_entries() == compact_cache_entries(T, pattern)


def test_wide_window_cache_grows_with_the_sequence():
    """A short prompt with a window far wider than itself holds (and attends over) only its tokens."""
    model = small_model(dilation=64, local_window=100_000, initial_tokens=3, attention_mode="sparse")
    dense_model = small_model(attention_mode="dense")
    ids = tokens(1, 10)
    with torch.no_grad():
        sparse = model(ids, use_cache=True).past_key_values
        dense = dense_model(ids, use_cache=True).past_key_values
    assert sparse.size()["allocated_bytes"] <= 2 * dense.size()["allocated_bytes"]
    for layer in sparse.layers:
        keys, _, positions = layer.view()
        assert keys.shape[2] == 3 + 10 and sorted(positions[positions >= 0].tolist()) == list(range(10))


def test_sparse_cache_is_compact_dense_cache_is_full():
    model = small_model(dilation=8, local_window=4, initial_tokens=2)
    ids = tokens(1, 200)
    with torch.no_grad():
        model.set_attention_mode("sparse")
        sparse = model(ids, use_cache=True).past_key_values
        model.set_attention_mode("dense")
        dense = model(ids, use_cache=True).past_key_values
    per_layer_sparse = 2 + 5 + (200 - 5) // 8 - 0            # P + W + 1 + chunk ends outside them
    assert sparse.num_entries() == 2 * per_layer_sparse
    assert dense.num_entries() == 2 * 200
    assert sparse.size()["kv_bytes"] * 4 < dense.size()["kv_bytes"]


@pytest.mark.parametrize("mode,overrides", [("dense", {}), ("sparse", PATTERNS["D4W2P1"]),
                                            ("sparse", PATTERNS["local"]), ("sparse", PATTERNS["hybrid"])],
                         ids=["dense", "D4W2P1", "local", "hybrid"])
def test_incremental_forward_in_pieces_equals_full(mode, overrides):
    """Prefill, multi-token extensions and single steps through the cache give the full logits."""
    model = small_model(attention_mode=mode, **overrides)
    ids = tokens(2, 37)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache()
        pieces, start = [], 0
        for n in (5, 1, 1, 7, 1, 3, 12, 1, 1, 5):
            pieces.append(model(ids[:, start:start + n], past_key_values=cache).logits)
            start += n
    assert start == 37 and cache.get_seq_length() == 37
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_continues_a_user_cache():
    model = small_model(attention_mode="sparse", **PATTERNS["D4W2P1"])
    ids = tokens(1, 10)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :6], past_key_values=cache)
    got = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, greedy_by_recomputation(model, ids, 8))


def test_padding_and_mode_mismatch_are_refused():
    model = small_model(attention_mode="sparse", dilation=4)
    ids = tokens(2, 6)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=mask)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, past_key_values=cache)
    model.set_attention_mode("dense")
    with pytest.raises(ValueError, match="cache was built"):
        model(ids[:, :1], past_key_values=cache)


def test_beam_search_and_sampling_with_cache_equal_without_cache():
    """Beam search reorders the cache (reorder_cache); sampling with several sequences expands it."""
    model = small_model(seed=3, attention_mode="sparse", initializer_range=0.15, **PATTERNS["D4W2P1"])
    ids = tokens(2, 6)
    beams = model.generate(ids, num_beams=3, max_new_tokens=10, do_sample=False)
    assert torch.equal(beams, model.generate(ids, num_beams=3, max_new_tokens=10, do_sample=False,
                                             use_cache=False))
    torch.manual_seed(0)
    s1 = model.generate(ids, do_sample=True, max_new_tokens=10, num_return_sequences=2)
    torch.manual_seed(0)
    s2 = model.generate(ids, do_sample=True, max_new_tokens=10, num_return_sequences=2, use_cache=False)
    assert s1.shape == (4, 16) and torch.equal(s1, s2)


def test_decode_kernel_entry_point_over_full_cache(monkeypatch):
    """Once the ring is full, decoding calls the kernels package's unmasked decode attention over
    the cache (the Triton kernel on CUDA; forced here on CPU): the logits stay the same."""
    from megatron_ratplus.hf import modeling_ratplus as mr
    if mr._kernel_decode_attention is None:
        pytest.skip("ratplus_kernels.dilated_attention.decode_attention is not importable")
    calls = []
    real = mr._kernel_decode_attention
    monkeypatch.setattr(mr, "_kernel_decode_attention", lambda *a: calls.append(a[1].shape[2]) or real(*a))
    monkeypatch.setattr(mr, "KERNELS_ON_CPU", True)
    monkeypatch.setattr(mr, "_kernel_fused_recurrence", None)      # only the decode entry point here
    monkeypatch.setattr(mr, "_kernel_fused_attention", None)
    model = small_model(attention_mode="sparse", **PATTERNS["D4W2P1"])     # full after P + W + 1 = 4 tokens
    ids = tokens(2, 30)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model.new_cache()
        steps = [model(ids[:, :2], past_key_values=cache).logits]
        steps += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(2, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    # steps t = 2 (seen 3 < 4) run masked SDPA; t = 3 .. 29 use the kernel, 2 layers each
    assert len(calls) == 2 * 27


def test_generate_refuses_a_cache_that_already_holds_every_given_token():
    """generate() appends to input_ids, so a cache holding all of them (or more) would be fed the
    same tokens again at every step (the cache grew to 183 tokens for a 20-token sequence)."""
    model = small_model(attention_mode="sparse", **PATTERNS["D4W2P1"])
    ids = tokens(1, 9)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, past_key_values=cache)
    with pytest.raises(ValueError, match="cache already holds 9 tokens but input_ids has 9"):
        model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match="followed by at least one new token"):
        model.generate(ids[:, 6:], past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert cache.get_seq_length() == 9                       # nothing was fed twice


def test_cache_of_another_batch_dtype_or_model_is_refused_clearly():
    model = small_model(attention_mode="sparse", **PATTERNS["D4W2P1"])
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens(2, 5), past_key_values=cache)
        with pytest.raises(ValueError, match="cache holds 2 sequences but this step has 1"):
            model(tokens(1, 1), past_key_values=cache)
        with pytest.raises(ValueError, match="another model or dtype"):
            model.to(torch.bfloat16)(tokens(2, 1), past_key_values=cache)
        model.float()
        three_layers = small_model(attention_mode="sparse", num_hidden_layers=3, dilation=4, local_window=2,
                                   initial_tokens=1)
        with pytest.raises(ValueError, match="cache has 2 layers but the model 3"):
            three_layers(tokens(2, 1), past_key_values=cache)
    with pytest.raises(NotImplementedError, match="speculative"):
        cache.crop(3)


def test_masks_are_checked_at_every_step():
    model = small_model(attention_mode="sparse", **PATTERNS["D4W2P1"])
    ids = tokens(1, 5)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, past_key_values=cache)
        step_mask = torch.ones(1, 6, dtype=torch.long)
        step_mask[0, 2] = 0
        with pytest.raises(ValueError, match="padded"):
            model(tokens(1, 1), attention_mask=step_mask, past_key_values=cache)
        with pytest.raises(ValueError, match="2-D attention_mask"):
            model(ids, attention_mask=torch.ones(1, 1, 5, 5))
        with pytest.raises(ValueError, match="no tokens"):
            model(ids[:, :0])
        with pytest.raises(ValueError, match="labels cover 5 positions but logits 1"):
            model(ids, labels=ids, logits_to_keep=1)


def test_many_initial_tokens_cost_only_what_the_cache_holds():
    """P far beyond the sequence: the cache holds (and attends over) the tokens seen, not P slots."""
    model = small_model(seed=3, attention_mode="sparse", initializer_range=0.15, dilation=4, local_window=2,
                        initial_tokens=100_000)
    ids = tokens(1, 10)
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, past_key_values=cache)
    layer = cache.layers[0]
    assert layer.keys.shape[2] <= 16 and layer.view()[0].shape[2] == 10
    got = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, greedy_by_recomputation(model, ids, 6))
