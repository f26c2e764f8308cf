"""Fuzzing: every committed corpus input and every past crash replays through its target with only
typed errors; the PDF corpus also goes through the real extraction process; and each target runs
under atheris for a few seconds (the full run, harness.py, gives each 60 s and merges new inputs)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fuzzrun import FUZZ, run_target

sys.path.insert(0, str(FUZZ))
import targets  # noqa: E402

CORPUS_SECONDS = 3


def _inputs(target: str) -> list[Path]:
    files = []
    for d in (FUZZ / "corpus" / target, FUZZ / "regressions" / target):
        if d.is_dir():
            files += sorted(d.iterdir())
    return files


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_corpus_replays_with_typed_errors_only(target):
    files = _inputs(target)
    assert files, f"fuzz/corpus/{target} is empty"
    for path in files:
        targets.TARGETS[target](path.read_bytes())  # raises on anything but the target's typed errors


def test_pdf_corpus_through_the_worker_process(tmp_path):
    from combllama.ingest import IngestError, IngestOptions
    from combllama.ingest.pdf import PdfSource

    for path in _inputs("pdf"):
        copy = tmp_path / "doc.pdf"
        copy.write_bytes(path.read_bytes())
        try:
            PdfSource().read(copy, IngestOptions(pdf_timeout_s=30))
        except IngestError as e:
            assert "\n" not in str(e)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_atheris_finds_no_crash(target, tmp_path):
    result = run_target(target, CORPUS_SECONDS, tmp_path)
    assert result.crashes == [], result.tail
    assert result.rc == 0, result.tail
    assert result.runs > 0, result.tail


def test_corrupt_deflate_stream_in_an_epub_is_a_source_error(tmp_path):
    """Found by atheris (fuzz/regressions/epub): zlib.error escaped SafeZip.read and sniff()."""
    from combllama import ingest
    from combllama.ingest import SourceError

    crash = sorted((FUZZ / "regressions" / "epub").iterdir())[0]
    for name in ("book.epub", "book.bin"):  # by suffix, and by content sniffing
        path = tmp_path / name
        path.write_bytes(crash.read_bytes())
        with pytest.raises(ingest.IngestError) as err:
            ingest.load(path)
        assert isinstance(err.value, SourceError) or "no source reads" in str(err.value)


@pytest.mark.parametrize("header", [
    b'{"b":{"dtype":"I32","shape":[4],"data_offsets":[0,{"x":1}]}}',  # found by atheris (st_header)
    b'{"b":{"dtype":"I32","shape":[4.0],"data_offsets":[0,16]}}',
    b'{"b":{"dtype":["I32"],"shape":[4],"data_offsets":[0,16]}}',
    b'{"b":{"dtype":"I32","shape":[true],"data_offsets":[0,4]}}',
    b'{"b":[1,2]}',
])
def test_malformed_tensor_entries_are_corrupt_memory(header):
    import struct

    from combllama.core.errors import CorruptMemoryError
    from combllama.core.memory.format import safetensors_header

    with pytest.raises(CorruptMemoryError, match="malformed"):
        safetensors_header(struct.pack("<Q", len(header)) + header + b"\0" * 16, "x")


@pytest.mark.parametrize("features", [[{"a": 1}], [["x"]], "abc", 5])
def test_required_features_must_be_a_list_of_names(features):
    """Found by atheris (manifest): a dict inside required_features raised TypeError."""
    import json

    from combllama.core.errors import CorruptMemoryError
    from combllama.core.memory.format import parse_manifest

    data = json.dumps({"format": "combllama-memory", "format_version": 1, "required_features": features}).encode()
    with pytest.raises(CorruptMemoryError, match="required_features"):
        parse_manifest(data, "x")


@pytest.mark.parametrize("offsets,match", [
    ([[0, 16], [0, 16]], "overlaps another"),  # found by the corruption corpus: v read k's bytes, served as valid
    ([[0, 16], [20, 36]], "leaves a hole"),
    ([[0, 16], [16, 32]], "end at byte 32 of a 36-byte"),
])
def test_tensors_must_tile_the_data_section(offsets, match):
    """Two tensors sharing bytes (or a gap, or trailing bytes) are corrupt, as the safetensors format says:
    the zero-copy reader takes offsets as given, so the header check must refuse them."""
    import json
    import struct

    from combllama.core.errors import CorruptMemoryError
    from combllama.core.memory.format import safetensors_header

    header = json.dumps({n: {"dtype": "F32", "shape": [4], "data_offsets": o}
                         for n, o in zip(("k", "v"), offsets)}).encode()
    with pytest.raises(CorruptMemoryError, match=match):
        safetensors_header(struct.pack("<Q", len(header)) + header + b"\0" * 36, "x")
    good = json.dumps({"k": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "v": {"dtype": "F32", "shape": [5], "data_offsets": [16, 36]}}).encode()
    assert set(safetensors_header(struct.pack("<Q", len(good)) + good + b"\0" * 36, "x")) == {"k", "v"}
