"""PDF source: pages and labels, encryption, scanned pages, and hostile inputs in the child process."""
from __future__ import annotations

import sys
import time
import zlib

import pytest
from builders import make_pdf

from combllama.ingest import IngestOptions, SourceError, label, load
from combllama.ingest import pdf as pdfmod
from combllama.ingest.pdf import build_document, clean_page_text


def test_pages_carry_index_and_printed_labels(tmp_path):
    p = make_pdf(tmp_path / "book.pdf", [["Preface words on the first page"], ["Roman two page text here"],
                                         ["Chapter one starts on this page"], ["And continues right here"]],
                 labels=[(0, 1, "/r", None, 1), (2, 3, "/D", None, 1)], outline=[("Chapter One", 2)])
    doc = load(p)
    assert doc.kind == "pdf" and len(doc.sections) == 4
    assert [(s.origin.page_index, s.origin.page_label) for s in doc.sections] == [(0, "i"), (1, "ii"), (2, "1"), (3, "2")]
    assert doc.sections[2].origin.title == "Chapter One" and doc.sections[3].origin.title == "Chapter One"
    text = doc.joined()
    a, b = text.index("Roman two"), text.index("Chapter one starts")
    assert label(doc.span(a, b + 5)) == "book.pdf p. ii-1"
    assert doc.skipped == [] and doc.warnings == []


def test_ligatures_and_hyphenation_are_mended():
    assert clean_page_text("an of\ufb01ce exam-\nple\x00") == "an office example"
    assert clean_page_text("well-\nKnown") == "well-\nKnown"  # a capital after the break: keep the hyphen


def test_empty_user_password_is_transparent(tmp_path):
    p = make_pdf(tmp_path / "owner-only.pdf", [["Secret but openable text"]], user_password="")
    doc = load(p)
    assert "openable" in doc.sections[0].text
    assert any("encrypted" in w for w in doc.warnings)


def test_real_password_needs_password_stdin(tmp_path):
    p = make_pdf(tmp_path / "locked.pdf", [["The locked words are here"]], user_password="hunter2")
    with pytest.raises(SourceError, match="encrypted; pass --password-stdin"):
        load(p)
    with pytest.raises(SourceError, match="password given does not open it"):
        load(p, IngestOptions(password="wrong"))
    doc = load(p, IngestOptions(password="hunter2"))
    assert "locked words" in doc.sections[0].text


def test_scanned_pdf_without_text_fails(tmp_path):
    p = make_pdf(tmp_path / "scan.pdf", [None, None, None], image_pages=(0, 1, 2))
    with pytest.raises(SourceError, match="none of its 3 pages has a text layer; run OCR"):
        load(p)


def test_partly_scanned_pdf_warns_and_skips_pages(tmp_path):
    p = make_pdf(tmp_path / "mixed.pdf", [["Real text on the first page"], None, ["7"], ["More real text here"]],
                 image_pages=(1, 2))
    doc = load(p)
    assert [s.origin.page_index for s in doc.sections] == [0, 3]
    assert [(s.path, s.reason) for s in doc.skipped] == [("mixed.pdf p. 2", "no-text-layer"),
                                                         ("mixed.pdf p. 3", "no-text-layer")]
    assert "2/4 pages have no text; run OCR first" in doc.warnings[0]


def test_build_document_reports_page_errors():
    answer = {"ok": True, "pages": [{"index": 0, "label": "1", "text": "good page text"},
                                    {"index": 1, "label": "2", "error": "PdfReadError: bad stream"}]}
    doc = build_document("x.pdf", "0" * 64, answer, IngestOptions())
    assert doc.skipped[0].reason == "page-error" and len(doc.sections) == 1


@pytest.mark.timeout(30)
def test_garbage_pdf_is_a_clean_error(tmp_path):
    p = tmp_path / "junk.pdf"
    p.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 40 + b"\n%%EOF")
    with pytest.raises(SourceError, match="junk.pdf: .*PDF"):
        load(p)


@pytest.mark.timeout(30)
def test_truncated_pdf_never_tracebacks(tmp_path):
    good = make_pdf(tmp_path / "good.pdf", [["Some text on a page"]] * 3).read_bytes()
    for cut in (20, len(good) // 3, len(good) // 2, len(good) - 30):
        p = tmp_path / f"cut{cut}.pdf"
        p.write_bytes(good[:cut])
        try:
            load(p)
        except SourceError as e:
            assert str(e).startswith(p.name)


@pytest.mark.timeout(30)
def test_circular_prev_xref_finishes(tmp_path):
    body = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
            b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
            b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>>endobj\n")
    xref_at = len(body)
    xref = (b"xref\n0 4\n0000000000 65535 f \n" + b"".join(b"%010d 00000 n \n" % body.index(b"%d 0 obj" % i)
                                                        for i in (1, 2, 3)))
    trailer = b"trailer<</Size 4/Root 1 0 R/Prev %d>>\nstartxref\n%d\n%%%%EOF\n" % (xref_at, xref_at)
    p = tmp_path / "loop.pdf"
    p.write_bytes(body + xref + trailer)
    with pytest.raises(SourceError):  # one blank page: no text, or a malformed-PDF message; never a hang
        load(p, IngestOptions(pdf_timeout_s=20))


@pytest.mark.timeout(60)
def test_decompression_bomb_is_bounded(tmp_path):
    bomb = zlib.compress(b"BT (a) Tj ET\n" + b" " * (300 * 1024 * 1024), 9)
    p = make_pdf(tmp_path / "bomb.pdf", [["Normal text on the first page"], None], flate_pages={1: bomb})
    t = time.monotonic()
    doc = load(p, IngestOptions(pdf_timeout_s=30))
    assert time.monotonic() - t < 30
    # pypdf's own output cap stops the 300 MB stream; the page is reported, the rest of the book survives.
    assert [s.origin.page_index for s in doc.sections] == [0]
    assert doc.skipped and doc.skipped[0].path == "bomb.pdf p. 2"


@pytest.mark.timeout(30)
def test_hanging_extraction_is_killed_at_the_timeout(tmp_path, monkeypatch):
    p = make_pdf(tmp_path / "slow.pdf", [["text"]])
    monkeypatch.setattr(pdfmod, "worker_command", lambda: [sys.executable, "-c", "import time; time.sleep(60)"])
    t = time.monotonic()
    with pytest.raises(SourceError, match=r"slow.pdf: skipped: malformed PDF \(timeout"):
        load(p, IngestOptions(pdf_timeout_s=1))
    assert time.monotonic() - t < 10


@pytest.mark.timeout(30)
def test_worker_death_is_reported(tmp_path, monkeypatch):
    p = make_pdf(tmp_path / "dies.pdf", [["text"]])
    monkeypatch.setattr(pdfmod, "worker_command",
                        lambda: [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(SourceError, match="killed by SIGKILL"):
        load(p)


@pytest.mark.timeout(30)
def test_memory_limit_applies_in_the_child(tmp_path):
    p = make_pdf(tmp_path / "mem.pdf", [["text on the page"]])
    with pytest.raises(SourceError, match=r"mem.pdf: skipped: malformed PDF \(memory limit of 40,000,000 bytes"):
        load(p, IngestOptions(pdf_memory_bytes=40_000_000))
