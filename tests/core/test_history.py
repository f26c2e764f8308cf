"""Long chats (core/history.py): the fold rule, segments of whole turns in the session's own memory,
compaction and forgetting under the byte budget, refolding when the turns change, and CombLlama memories
read together (core/chat.py combine)."""
from __future__ import annotations

import pytest

from combllama.core.chat import combine
from combllama.core.errors import BadInputError
from combllama.core.history import HistoryPolicy, Segment, SessionHistory, fold_point, turn_counter
from combllama.core.methods import Budget, get_method

INIT = {"adapter": "init"}


def turns(n, start=1, words=20):
    return [(i, f"Question {i}: " + " ".join(f"w{i}x{j}" for j in range(words)), f"Answer {i} is {i * 37}.")
            for i in range(start, start + n)]


def history(tiny, tmp_path, method="combllama", params=INIT, **policy):
    policy = HistoryPolicy(**{"recent_tokens": 200, "fold_tokens": 100, **policy})
    return SessionHistory(tiny, tmp_path / "hist", get_method(method, params), policy, "s",
                          turn_counter(tiny.tokenizer))


def test_fold_point_keeps_the_recent_turns_verbatim():
    p = HistoryPolicy(recent_tokens=100, fold_tokens=40)
    assert fold_point([30, 30, 30], 0, p) == 0  # fits
    assert fold_point([30] * 5, 0, p) == 3  # 150 > 100: fold until ≤ 60 remain
    assert fold_point([30] * 5, 3, p) == 3  # already folded
    assert fold_point([500], 0, p) == 0  # the newest turn always stays
    assert fold_point([500, 500], 0, p) == 1
    for bad in ({"fold_tokens": 8}, {"recent_tokens": 10, "fold_tokens": 20}, {"budget_bytes": 0},
                {"min_fraction": 0}):
        with pytest.raises(BadInputError):
            HistoryPolicy(**bad)
    assert HistoryPolicy.for_window(8192, 0).recent_tokens == 1024
    assert HistoryPolicy.for_window(1200, 1000).recent_tokens == 64  # a full window still folds something


def test_turns_fold_into_cross_memory_segments(tiny, tmp_path):
    h = history(tiny, tmp_path)
    count = h.count_tokens
    ts = turns(12)
    result = h.sync(ts)
    assert result.folded > 0 and [e.kind for e in result.events] == ["fold"]
    assert sum(count(q, a) for _, q, a in ts[result.folded:]) <= 200
    seg = h.segments()
    assert seg == [Segment.of(1, result.folded, False)]
    (name, manifest, memory), = h.parts()
    assert name == f"history-1-{result.folded}" and manifest["source"]["kind"] == "chat"
    assert manifest["chunks"][-1]["source"][-1]["title"] == f"turn {result.folded}"  # cited by turn
    assert memory.cross.keys[0].shape[2] == manifest["source"]["doc_tokens"]
    assert result.bytes == h.bytes() <= h.budget
    # Nothing new: nothing happens. More turns: a new segment, the first one untouched.
    assert h.sync(ts).events == []
    first = (h.root / seg[0].name / "MANIFEST.json").stat().st_mtime_ns
    more = h.sync(turns(20))
    assert [e.kind for e in more.events] == ["fold"] and len(h.segments()) == 2
    assert (h.root / seg[0].name / "MANIFEST.json").stat().st_mtime_ns == first
    assert [s.first for s in h.segments()] == [1, result.folded + 1]
    # An edited early turn (or a cleared session) invalidates the segments: the turns fold again.
    edited = turns(20)
    edited[0] = (1, edited[0][1], "A different answer.")
    again = h.sync(edited)
    assert again.events and again.folded == more.folded
    assert h.sync([]).folded == 0 and h.segments() == []


def test_memories_of_turns_read_together_with_a_document(tiny, tmp_path, long_doc, store):
    from combllama.core.encode import ingest
    from combllama.core.fast.load import attach_reader

    method = get_method("combllama", INIT, Budget(fraction=1.0))  # unpruned: every token is in the cross memory
    ingest(tiny, long_doc, method, store, name="doc")
    doc = store.open("doc")
    doc_mem = attach_reader(doc, tiny)
    h = history(tiny, tmp_path)
    h.sync(turns(30))
    parts = [("doc", doc.manifest, doc_mem)] + h.parts()
    attached = combine(tiny, parts)
    assert attached.names == ["doc"] + [p[0] for p in parts[1:]] and not attached.apart
    memory = attached.memory
    # The prompt prefix once, then the document's recent tail; folded turns are all cross memory (no positions).
    assert memory.logical_length == doc_mem.logical_length == doc_mem.prefix + method.options.recent
    assert all(m.logical_length == m.prefix for _, _, m in parts[1:])
    for i, k in enumerate(memory.cross.keys):
        assert k.shape[2] == sum(m.cross.keys[i].shape[2] for _, _, m in parts)
    tail = method.options.recent
    assert doc_mem.cross.keys[0].shape[2] == doc.manifest["source"]["doc_tokens"] - tail  # the parts are unchanged
    # A memory of another kind cannot join: the latest answers alone, and the caller is told.
    ingest(tiny, long_doc, get_method("full"), store, name="plain")
    plain = store.open("plain")
    mixed = combine(tiny, [("doc", doc.manifest, doc_mem), ("plain", plain.manifest, attach_reader(plain, tiny))])
    assert mixed.names == ["plain"] and mixed.apart == ["doc"]


def test_budget_compacts_then_forgets(tiny, tmp_path):
    h = history(tiny, tmp_path)
    h.sync(turns(40))
    unbounded = h.bytes()
    h.clear()
    tight = history(tiny, tmp_path, budget_bytes=unbounded // 2)
    seen = []
    for n in range(8, 41, 4):
        result = tight.sync(turns(n))
        assert result.bytes <= tight.budget  # within the budget after every turn
        seen += [e.kind for e in result.events]
    assert "compact" in seen and "forget" not in seen
    (seg,) = [s for s in tight.segments() if s.compacted]
    assert seg.first == 1  # every folded turn is still in memory, at a lower fraction
    # A method that cannot compress (here: compaction below min_fraction) forgets the oldest turns.
    strict = history(tiny, tmp_path / "b", budget_bytes=unbounded // 3, min_fraction=1.0)
    for n in range(8, 41, 4):
        result = strict.sync(turns(n))
        assert result.bytes <= strict.budget
    assert strict.forgotten_through() > 0 and strict.segments()[0].first == strict.forgotten_through() + 1
    assert result.folded == strict.sync(turns(40)).folded  # forgotten turns stay out of the prompt


def test_methods_with_positions_do_not_fold(tiny, tmp_path):
    h = history(tiny, tmp_path, method="full", params=None)
    assert h.sync(turns(40)).folded == 0 and h.segments() == []


def test_compaction_sizes_what_scales_and_keeps_the_prefix_once(tiny, tmp_path):
    """The prompt prefix's cache (in every segment) does not shrink with the fraction: compaction sizes the
    cross memory alone, so a budget that holds the turns at a lower fraction keeps them all."""
    h = history(tiny, tmp_path)
    for n in range(8, 41, 4):
        h.sync(turns(n))
    readers = [h.store.open(s.name) for s in h.segments()]
    fixed = [h.method.fixed_bytes(r.manifest) for r in readers]
    assert len(readers) > 2 and len(set(fixed)) == 1 and fixed[0] > 0
    cross = sum(r.stats()["tensor_bytes"] for r in readers) - sum(fixed)
    h.clear()
    budget = 2 * (fixed[0] + cross // 4)  # half of it holds the prefix once and a quarter of the cross memory
    tight = history(tiny, tmp_path, budget_bytes=budget)
    for n in range(8, 41, 4):
        result = tight.sync(turns(n))
        assert result.bytes <= budget
    segs = tight.segments()
    assert tight.forgotten_through() == 0 and segs[0].compacted and segs[0].first == 1


def test_segments_of_another_adapter_fold_again(tiny, tmp_path):
    """A session folded with one CombLlama adapter and continued after the adapter behind the same option changed
    (the shipped adapter replaced by an upgrade) folds its turns again instead of failing to attach them."""
    import torch

    from combllama.core.methods.combllama import method as comb_method
    from combllama.core.methods.combllama.modules import CombAdapter, CombConfig
    from combllama.core.methods.combllama.weights import save_adapter, weights_fingerprint

    path = tmp_path / "adapter.safetensors"

    def ship(seed):
        torch.manual_seed(seed)
        adapter = CombAdapter.from_base(tiny.model, CombConfig.for_model(tiny.model.config, rank=4))
        for p in adapter.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
        save_adapter(path, adapter, base_fingerprint=tiny.fingerprint, base_weights=weights_fingerprint(tiny.model),
                     base_name=tiny.name, info={})
        comb_method._cache.pop(tiny.model, None)

    try:
        ship(1)
        h = history(tiny, tmp_path, params={"adapter": str(path)})
        folded = h.sync(turns(30)).folded
        old = {s.name for s in h.segments()}
        assert folded and old and len(h.parts()) == len(old)
        ship(2)
        upgraded = history(tiny, tmp_path, params={"adapter": str(path)})
        assert upgraded.sync(turns(30)).folded == folded  # folded again, with the new adapter
        parts = upgraded.parts()
        assert len(parts) == len(old) and all(m.cross.adapter is parts[0][2].cross.adapter for _, _, m in parts)
    finally:
        comb_method._cache.pop(tiny.model, None)
