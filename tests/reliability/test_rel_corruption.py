"""The corruption corpus (corrupt.py) over a real memory: only typed errors, nothing served that
differs from the intact memory, no pickle run, nothing attached after an error, bounded RSS."""
from __future__ import annotations

import pytest
from corrupt import run_corpus

from combllama.core.encode import EncodeConfig, ingest
from combllama.core.methods import get_method


@pytest.mark.timeout(900)
def test_corruption_corpus(tiny, sample_doc, store):
    ingest(tiny, sample_doc, get_method("full"), store, name="m", config=EncodeConfig(chunk_tokens=128))
    # CI: every cut in the first 512 bytes (length prefix and header), 60 random cuts and 150 bit flips
    # per file; the full run (harness.py) cuts every offset of the first 64 KiB and flips 1,000 bits per file.
    result = run_corpus(store.root / "m", tiny.fingerprint, flips=150, random_cuts=60, head_cuts=512)
    assert result.untyped == []
    assert result.silent == []
    assert not result.pickle_ran
    assert result.attach_reached_on_error == 0
    assert result.cases > 2000
    # Hostile lengths (2**62-byte headers, 10**12 tokens, 2**31-wide shapes) allocate nothing in proportion
    # to what they claim: memory follows the bytes actually read (tiny JSON objects cost ~20x their text).
    assert result.traced_cases > 100
    assert result.max_peak_per_input_byte < 32, result.max_peak_per_input_byte
    bound = 64 * 2 ** 20 + 48 * result.largest_case_bytes
    assert result.rss_growth_bytes < bound and result.rss_after_minus_before < bound, result.to_dict()
