"""hcattention: product quantization, τ selection, the read path, and encode → disk → attach against `full`."""
from __future__ import annotations

import math

import pytest
import torch

from combllama.core.encode import EncodeConfig, ingest, plan_memory
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.errors import BadInputError, ResourceError
from combllama.core.methods import Budget, from_manifest, get_method
from combllama.core.methods.base import prefill, trim_cache
from combllama.core.methods.hcattention import accounting, serve
from combllama.core.methods.hcattention import method as hc_method
from combllama.core.methods.hcattention import quant as Q
from combllama.core.methods.hcattention.read import HostRows, Layer, Store, read_layer, select, select_exact
from combllama.core.prompt import turn_ids

QUESTION = "Who is the keeper of the lighthouse at Gull Point?"


def _memory(loaded, doc, store, name, params=None, chunk_tokens=48, budget=None):
    method = get_method(name, params, budget)
    result = ingest(loaded, doc, method, store, name=f"{name}-{len(store.names())}",
                    config=EncodeConfig(chunk_tokens=chunk_tokens))
    reader = store.open(result.name)
    assert reader.verify() == []
    return reader, from_manifest(reader.manifest).attach(loaded.model, reader.manifest, reader.chunks())


# --- quantization ----------------------------------------------------------------------------------------

def test_kmeans_error_falls_with_more_centroids_and_codes_stay_in_range():
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 300, 16)
    errors = []
    for c in (4, 16, 64, 256):
        books = Q.calibrate(keys, 4, c, 10, 0)
        codes = Q.encode_keys(keys, books)
        assert books.shape == (2, 3, 4, c, 4) and codes.shape == (2, 3, 300, 4) and codes.dtype == torch.uint8
        assert int(codes.max()) < c
        errors.append(float(((Q.decode_keys(codes, books) - keys) ** 2).mean()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1 * errors[0]
    assert Q.code_dtype(4096) == torch.int16


def test_kmeans_is_deterministic_and_exact_when_centroids_cover_the_points():
    x = torch.randn(5, 40, 2)
    a, b = Q.kmeans(x, 8, 5, seed=3), Q.kmeans(x, 8, 5, seed=3)
    assert torch.equal(a, b)
    cent = Q.kmeans(x, 40, 3, seed=0)  # one centroid per point
    _, dist = Q.nearest(x, cent)
    assert float(dist.max()) < 1e-5  # float rounding of ||x||² - 2x·c + ||c||²


def test_lookup_table_scores_equal_dot_products_with_reconstructed_keys():
    keys = torch.randn(1, 2, 50, 8)
    books = Q.calibrate(keys, 2, 16, 5, 0)
    codes = Q.encode_keys(keys, books)[0]  # [H, n, g]
    q = torch.randn(2, 3, 8)
    z = Q.approx_logits(q, books[0], codes, block_tokens=7)  # blocks smaller than n
    torch.testing.assert_close(z, q @ Q.decode_keys(codes, books[0]).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_int8_rows_round_trip():
    x = torch.randn(3, 10, 16) * 5
    qx, s = Q.quantize_rows(x)
    assert qx.dtype == torch.int8 and s.shape == (3, 10)
    torch.testing.assert_close(Q.dequantize_rows(qx, s, torch.float32), x, atol=float(s.max()) * 0.51, rtol=0)


# --- selection and the read path ---------------------------------------------------------------------------

def test_exact_selection_holds_tau_of_the_mass_and_is_minimal_per_row():
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 200) * 3
    resident = torch.full((2, 1), -torch.inf)
    for tau in (0.5, 0.9, 0.99):
        mask = select_exact(logits, resident, tau)
        p = logits.softmax(-1)[:, 0]
        kept = (p * mask).sum(-1)
        assert bool((kept >= tau - 1e-6).all())
        # minimal: dropping the smallest selected token falls below τ
        smallest = torch.where(mask, p, torch.inf).amin(-1)
        assert bool((kept - smallest < tau).all())
    assert bool(select_exact(logits, resident, 1.0).all())
    assert not bool(select_exact(logits, torch.full((2, 1), 50.0), 0.9).any())


@pytest.mark.parametrize("scale, resident_logit", [(3.0, None), (0.3, None), (8.0, None), (3.0, 4.0)])
def test_binned_selection_is_the_exact_set_plus_at_most_one_bin(scale, resident_logit):
    """select (no sort) ⊇ select_exact, holds τ, and adds only tokens within e^BUCKET_NATS of the exact
    set's smallest probability: peaked, flat and very peaked rows, with and without resident mass."""
    from combllama.core.methods.hcattention.read import BUCKET_NATS

    torch.manual_seed(3)
    H, R, n = 3, 4, 5000
    logits = torch.randn(H, R, n) * scale
    logits[0, :, 100:200] = -torch.inf  # invalid tokens are never selected
    resident = torch.full((H, R), -torch.inf if resident_logit is None else resident_logit)
    for tau in (0.5, 0.9, 0.99):
        fast, exact = select(logits, resident, tau), select_exact(logits, resident, tau)
        assert bool((fast | ~exact).all())  # superset
        assert not bool(fast[0, 100:200].any())
        lse = torch.logaddexp(logits.logsumexp(-1), resident)
        p = (logits - lse[..., None]).exp()  # [H, R, n]
        share = (resident - lse).exp()
        assert bool(((p * fast[:, None]).sum(-1) + share >= tau - 1e-5).all())
        # every extra token is within one bin of some row's exact cut (the smallest p that row needs)
        ratio = torch.zeros(H, n)
        for r in range(R):
            row_exact = select_exact(logits[:, r:r + 1], resident[:, r:r + 1], tau)  # [H, n]
            cut = torch.where(row_exact, p[:, r], torch.inf).amin(-1, keepdim=True)  # [H, 1]
            ratio = torch.maximum(ratio, torch.where(torch.isinf(cut), 0.0, p[:, r] / cut))
        extra = fast & ~exact
        assert bool((ratio[extra] >= math.exp(-BUCKET_NATS) * (1 - 1e-4)).all())
    assert bool(select(logits, resident, 1.0)[1:].all())
    assert not bool(select(logits, torch.full((H, R), 50.0), 0.9).any())


def test_padded_indices_lists_each_rows_selection_in_order():
    from combllama.core.methods.hcattention.read import _padded_indices

    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, [1, 4, 9]] = True
    mask[2, [0]] = True
    idx, valid = _padded_indices(mask)
    assert idx.tolist() == [[1, 4, 9], [0, 0, 0], [0, 0, 0]]
    assert valid.tolist() == [[True, True, True], [False, False, False], [True, False, False]]


def test_gqa_selection_is_the_union_over_the_group():
    logits = torch.full((1, 2, 6), -10.0)
    logits[0, 0, 1] = 10.0
    logits[0, 1, 4] = 10.0
    mask = select(logits, torch.full((1, 2), -torch.inf), 0.9)
    assert mask[0].nonzero().flatten().tolist() == [1, 4]


def _synthetic_layer(H=2, n=400, D=16, sinks=2, recent=3, peak=6.0, exact_keys=True):
    torch.manual_seed(2)
    keys = torch.randn(H, n + sinks + recent, D)
    vals = torch.randn(H, n + sinks + recent, D)
    books = Q.calibrate(keys[None, :, sinks:sinks + n], 2, 64, 10, 0)[0]
    codes = Q.encode_keys(keys[None, :, sinks:sinks + n], books[None])[0]
    res = torch.cat([torch.arange(sinks), torch.arange(sinks + n, sinks + n + recent)])
    lay = Layer(codes, books, HostRows(vals[:, sinks:sinks + n].contiguous()),
                HostRows(keys[:, sinks:sinks + n].contiguous()) if exact_keys else None,
                keys[:, res], vals[:, res])
    q = keys[:, sinks + 17][None, :, None] * peak  # the query matches one middle key: peaked attention
    q = q.repeat_interleave(2, 1)  # [1, Hq = 2H, 1, D]
    return lay, keys, vals, q


def _exact(q, keys, vals, tail_k, tail_v, scale):
    G = q.shape[1] // keys.shape[0]
    k = torch.cat([keys, tail_k[0]], 1).repeat_interleave(G, 0)
    v = torch.cat([vals, tail_v[0]], 1).repeat_interleave(G, 0)
    return ((q[0] @ k.transpose(1, 2) * scale).softmax(-1) @ v).transpose(0, 1)[None]  # [1, q, Hq, D]


@pytest.mark.parametrize("transfer", ["gather", "host"])
def test_read_path_matches_exact_attention(transfer):
    lay, keys, vals, q = _synthetic_layer()
    tail_k, tail_v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    scale = 16 ** -0.5
    ref = _exact(q, keys, vals, tail_k, tail_v, scale)
    exact = read_layer(Store([lay], 1.0, transfer, True, torch.float32), 0, q, tail_k, tail_v, scale)
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5)
    st = Store([lay], 0.9, transfer, True, torch.float32)
    out = read_layer(st, 0, q, tail_k, tail_v, scale)
    assert st.counts["selected"] < st.counts["selectable"] // 4  # peaked: few tokens read
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())


def test_read_path_with_approximate_weights_and_several_queries():
    """Without exact keys the weights come from the codes (the paper's ã): at τ=1 the output is exact
    attention over the reconstructed keys, each query position seeing the tail up to itself."""
    lay, keys, vals, q = _synthetic_layer(exact_keys=False)
    keys = keys.clone()
    keys[:, 2:402] = Q.decode_keys(lay.codes, lay.codebooks)  # what the lookup tables score
    q = torch.cat([q, q * 0.5, q * 0.1], 2)  # 3 query positions
    tail_k, tail_v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    scale = 16 ** -0.5
    for transfer in ("gather", "host"):
        out = read_layer(Store([lay], 1.0, transfer, False, torch.float32), 0, q, tail_k, tail_v, scale)
        for i in range(3):
            ref = _exact(q[:, :, i:i + 1], keys, vals, tail_k[:, :, :i + 1], tail_v[:, :, :i + 1], scale)
            torch.testing.assert_close(out[:, i:i + 1], ref, rtol=1e-4, atol=1e-4)


# --- accounting -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,tokens", [((30, 3, 64), 4096), ((30, 3, 64), 8192), ((32, 8, 128), 131072),
                                          ((32, 8, 128), 1_000_000)])
def test_default_settings_keep_the_device_share_at_most_one_eighth(shape, tokens):
    L, H, D = shape
    o = hc_method.HCAttentionOptions()
    lay = hc_method.plan_layout(0.125, tokens, L, H, D, o)
    acc = accounting(tokens, L, H, D, lay.sub_dim, lay.centroids, o.sinks, lay.recent, outliers=o.outliers)
    assert acc["device_share"] <= 0.125 and acc["outliers"] > 0
    # g = D/4 one-byte codes: 6.25% of the KV, the rest for codebooks, outliers and the exact window
    assert lay.sub_dim == 4 and lay.centroids == o.centroids
    assert lay.recent == o.recent or tokens < 8192  # at 4K the window gives way to keep 256 centroids


@pytest.mark.parametrize("tokens", [200, 1000, 4000, 7000])
def test_short_documents_get_fine_codes_within_the_budget(tokens):
    """SmolLM2 geometry at the harness's lengths: the planner trades centroids and recent window (not code
    width) for the budget, and the chosen layout fits it (a 200-token context needs coarser codes)."""
    o = hc_method.HCAttentionOptions()
    lay = hc_method.plan_layout(0.125, tokens, 30, 3, 64, o)
    assert lay.sub_dim <= (hc_method.FINE_SUB_DIM if tokens >= 1000 else 8)
    acc = accounting(tokens, 30, 3, 64, lay.sub_dim, lay.centroids, o.sinks, lay.recent, outliers=o.outliers)
    assert acc["device_share"] <= 0.125
    assert hc_method.plan_layout(0.125, tokens, 30, 3, 64, o, lay.sub_dim, lay.centroids) == lay  # attach agrees
    assert hc_method.plan_layout(1e-6, tokens, 30, 3, 64, o).sub_dim == 16  # nothing fits: the coarsest


def test_resource_check_names_what_to_change(monkeypatch):
    monkeypatch.setattr(hc_method, "host_available", lambda: 1024)
    with pytest.raises(ResourceError, match="value_bits=8"):
        hc_method.check_resources(torch.device("cpu"), {"key codes": 10}, 4096)


def test_options_are_validated():
    for bad in ({"tau": 0}, {"tau": 1.5}, {"sub_dim": 3}, {"value_bits": 4}, {"transfer": "pci"},
                {"prefill": "lazy"}, {"centroids": 1}):
        with pytest.raises(BadInputError):
            get_method("hcattention", bad)


# --- encode → disk → attach ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params,books_at", [({"transfer": "gather"}, -1),
                                             ({"transfer": "host", "prefill": "exact", "calib_span": 64}, 1)])
def test_tau_one_reproduces_full_logits_and_answer(tiny, sample_doc, store, params, books_at):
    _, full = _memory(tiny, sample_doc, store, "full")
    reader, hc = _memory(tiny, sample_doc, store, "hcattention",
                         {"tau": 1.0, "recent": 8, "calib_tokens": 64, **params})
    assert hc.logical_length == full.logical_length and hc.lengths == [0] * len(hc.lengths)
    # the calibration sample spans the whole memory (codebooks in the last chunk) or its first 64 tokens
    # (48-token chunks: the 2nd chunk completes it); every other chunk gets its codes at attach or encode
    chunks = reader.manifest["chunks"]
    assert [i for i, r in enumerate(chunks) if "codebooks" in r["tensors"]] == [range(len(chunks))[books_at]]
    assert hc.accounts["outlier_entries"] > 0
    q = turn_ids(tiny.tokenizer, QUESTION)
    ref = prefill(tiny.model, q, full.cache, full.logical_length, full.lengths[0])
    got = prefill(tiny.model, q, hc.cache, hc.logical_length, hc.lengths[0])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    trim_cache(full.cache, full.lengths)
    trim_cache(hc.cache, hc.lengths)
    a = list(Engine(tiny.model, full, tiny.eos_ids).generate(q, GenerateOptions(max_new_tokens=12)))
    b = list(Engine(tiny.model, hc, tiny.eos_ids).generate(q, GenerateOptions(max_new_tokens=12)))
    assert a == b
    assert [lay.keys.shape[-2] for lay in hc.cache.layers] == [0] * len(hc.lengths)  # trimmed to the memory


def test_a_memory_from_before_the_spread_calibration_outliers_and_rescoring_still_serves(tiny, sample_doc, store):
    """Memories written before calib_span, outliers and candidates existed: codebooks in the first chunk, codes in
    every later one, and params without those keys (they take their defaults at attach). Still exact at τ = 1."""
    import json

    from combllama.core.memory.format import CHECKSUM, manifest_checksum

    _, full = _memory(tiny, sample_doc, store, "full")
    reader, _ = _memory(tiny, sample_doc, store, "hcattention", {"tau": 1.0, "recent": 8, "calib_tokens": 40,
                                                                  "calib_span": 40, "outliers": 0.0})
    path = reader.root / "MANIFEST.json"
    manifest = json.loads(path.read_text())
    for key in ("calib_span", "outliers", "candidates"):
        del manifest["method"]["params"][key]
    manifest[CHECKSUM] = manifest_checksum(manifest)  # sealed as the older code sealed it
    path.write_text(json.dumps(manifest))
    old = store.open(reader.name)
    assert "codebooks" in old.manifest["chunks"][0]["tensors"]
    assert all("codes" in r["tensors"] for r in old.manifest["chunks"][1:])
    hc = from_manifest(old.manifest).attach(tiny.model, old.manifest, old.chunks())
    q = turn_ids(tiny.tokenizer, QUESTION)
    torch.testing.assert_close(prefill(tiny.model, q, hc.cache, hc.logical_length, hc.lengths[0]),
                               prefill(tiny.model, q, full.cache, full.logical_length, full.lengths[0]),
                               rtol=1e-4, atol=1e-4)


def test_default_settings_stay_close_to_full(tiny, long_doc, store):
    _, full = _memory(tiny, long_doc, store, "full", chunk_tokens=256)
    _, hc = _memory(tiny, long_doc, store, "hcattention", chunk_tokens=256)
    q = turn_ids(tiny.tokenizer, "Which lantern hangs in room 3?")
    ref = prefill(tiny.model, q, full.cache, full.logical_length, full.lengths[0]).softmax(-1)
    got = prefill(tiny.model, q, hc.cache, hc.logical_length, hc.lengths[0]).softmax(-1)
    assert float((ref - got).abs().sum()) < 0.1  # total variation of the next-token distribution
    st = hc.store
    st.reset_stats()  # one decode step: a random model attends almost uniformly, yet τ = 0.9 reads less
    prefill(tiny.model, [int(got.argmax())], hc.cache, hc.logical_length + len(q), len(q))
    assert 0 < st.counts["selected"] < st.counts["selectable"] and st.counts["steps"] == len(hc.store.layers)
    assert hc.accounts["device_share"] <= 0.125 and hc.accounts["sub_dim"] == 4
    assert hc.kv_entries() <= 0.125 * hc.accounts["entries"]


def test_int8_values_and_anchor_prefill(tiny, sample_doc, store):
    _, full = _memory(tiny, sample_doc, store, "full")
    reader, hc = _memory(tiny, sample_doc, store, "hcattention",
                         {"tau": 1.0, "value_bits": 8, "prefill": "anchor", "calib_tokens": 64})
    assert reader.manifest["chunks"][0]["tensors"]["v"][0] == "I8"
    assert hc.store.layers[0].host_v.data.dtype == torch.int8
    q = turn_ids(tiny.tokenizer, QUESTION)
    ref = prefill(tiny.model, q, full.cache, full.logical_length, full.lengths[0]).softmax(-1)
    got = prefill(tiny.model, q, hc.cache, hc.logical_length, hc.lengths[0]).softmax(-1)
    assert float((ref - got).abs().sum()) < 0.2  # anchor prefill sees less context than full; int8 rows


def test_resume_equals_an_uninterrupted_encode(tiny, sample_doc):
    from combllama.core.tokenize import Chunk

    method = get_method("hcattention", {"calib_tokens": 100, "value_bits": 8})
    plan = plan_memory(tiny, sample_doc, method, EncodeConfig(chunk_tokens=48))
    chunks = [Chunk(i, s, e, tuple(plan.ids[s:e])) for i, (s, e) in enumerate(plan.spans)]
    whole = method.encoder(tiny.model, len(plan.ids))
    outs = [whole.encode(c) for c in chunks]
    again = method.encoder(tiny.model, len(plan.ids))
    for c, t in zip(chunks[:3], outs[:3]):
        again.restore(c, t)
    for c, t in zip(chunks[3:], outs[3:]):
        got = again.encode(c)
        assert got.keys() == t.keys() and all(torch.equal(got[k], t[k]) for k in t)


def test_calibration_text_is_used_and_recorded(tiny, sample_doc, store):
    method = get_method("hcattention", {"tau": 1.0})
    method.calibrate_on(tiny.tokenizer("A calibration text about ships and harbours. " * 20)["input_ids"])
    result = ingest(tiny, sample_doc, method, store, name="calib", config=EncodeConfig(chunk_tokens=48))
    reader = store.open(result.name)
    assert reader.manifest["method"]["params"]["calibration"].startswith("ids:")
    assert "codebooks" in reader.manifest["chunks"][0]["tensors"] and "codes" in reader.manifest["chunks"][0]["tensors"]
    memory = from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())
    _, full = _memory(tiny, sample_doc, store, "full")
    q = turn_ids(tiny.tokenizer, QUESTION)
    torch.testing.assert_close(prefill(tiny.model, q, memory.cache, memory.logical_length, 0),
                               prefill(tiny.model, q, full.cache, full.logical_length, full.lengths[0]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("base", ["full", "kvcompose"])
def test_other_memories_served_the_hcattention_way(tiny, long_doc, store, base):
    budget = Budget(fraction=0.5) if base == "kvcompose" else None
    reader, plain = _memory(tiny, long_doc, store, base, chunk_tokens=256, budget=budget)
    q = turn_ids(tiny.tokenizer, "Which lantern hangs in room 3?")
    ref = prefill(tiny.model, q, plain.cache, plain.logical_length, plain.lengths[0],
                  ).float()
    hc = serve(tiny.model, reader.manifest, reader.chunks(), hc_method.HCAttentionOptions(tau=1.0, calib_tokens=256))
    assert hc.logical_length == plain.logical_length
    got = prefill(tiny.model, q, hc.cache, hc.logical_length, 0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    trim_cache(hc.cache, hc.lengths)
    default = serve(tiny.model, reader.manifest, reader.chunks())
    assert default.accounts["device_share"] <= 0.125
    assert float((prefill(tiny.model, q, default.cache, default.logical_length, 0).softmax(-1)
                  - ref.softmax(-1)).abs().sum()) < 0.1


def test_a_memory_read_by_another_attention_is_refused(tiny, sample_doc, store):
    from combllama.core.methods.kvcompose import use_ragged_attention

    _, hc = _memory(tiny, sample_doc, store, "hcattention", {"calib_tokens": 64})
    use_ragged_attention(tiny.model)  # what attaching a kvcompose memory afterwards does
    with pytest.raises(BadInputError, match="attach it again"):
        prefill(tiny.model, [1, 2, 3], hc.cache, hc.logical_length, 0)


def _needle(outliers: float, candidates: float):
    """A repetitive text (few distinct keys) with one key unlike the rest, coded by 8-wide codes calibrated
    without it; a query aimed at it. → (read_layer output, exact attention, store counts, store)."""
    from types import SimpleNamespace

    torch.manual_seed(5)
    H, D, N, needle = 2, 16, 600, 300
    filler = torch.randn(4, D)
    keys = filler[torch.randint(0, 4, (H, N))] + 0.05 * torch.randn(H, N, D)
    vals = torch.randn(H, N, D)
    keys[:, needle] = torch.randn(H, D)
    model = SimpleNamespace(config=SimpleNamespace(num_key_value_heads=H, head_dim=D, num_attention_heads=2 * H),
                            device=torch.device("cpu"), dtype=torch.float32)
    q = keys[:, needle][None, :, None].repeat_interleave(2, 1) * 2.0  # [1, Hq, 1, D] aimed at the needle
    tail_k, tail_v = torch.randn(1, H, 1, D), torch.randn(1, H, 1, D)
    scale = D ** -0.5
    o = hc_method.HCAttentionOptions(sinks=2, recent=3, outliers=outliers, centroids=16, candidates=candidates)
    b = hc_method._Builder(model, [N], o, 2, 16, torch.float32, pin=False)
    b.set_codebooks(Q.calibrate(keys[None, :, :200], 8, 16, 10, 0))  # a calibration sample without the needle
    b.put(0, 0, N, keys, vals)
    store = b.finish(o)
    out = read_layer(store, 0, q, tail_k, tail_v, scale)
    return out, _exact(q, keys, vals, tail_k, tail_v, scale), store.counts, store


def test_outliers_score_a_needle_exactly():
    """A key unlike every other (a needle in filler) is what coarse codes rank too low; the builder keeps the
    worst-coded keys exact on the device, and with them τ = 0.9 reads the needle and matches exact attention."""
    plain, ref, _, _ = _needle(0.0, 0.9)
    out, _, _, store = _needle(0.01, 0.9)
    assert (store.layers[0].out_idx == 300 - 2).any(1).all()  # middle index of the needle, every head
    tol = 0.1 * float(ref.abs().max())  # τ = 0.9 drops up to a tenth of the mass
    assert float((out - ref).abs().max()) < tol < float((plain - ref).abs().max())


def test_candidates_rescored_exactly_find_the_needle_and_read_fewer_values():
    """Without outliers, a wider approximate candidate set re-scored with exact keys finds the needle; the
    values read are the τ share of the exact attention, fewer than the candidates (and than plain τ reads)."""
    plain, ref, plain_counts, _ = _needle(0.0, 0.9)
    out, _, counts, _ = _needle(0.0, 0.999)
    tol = 0.1 * float(ref.abs().max())
    assert float((out - ref).abs().max()) < tol < float((plain - ref).abs().max())
    assert counts["selected"] < counts["candidates"] and counts["selected"] < plain_counts["selected"]
