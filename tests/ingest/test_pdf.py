"""PDF source: pages and labels, encryption, scanned pages, and hostile inputs in the child process."""
from __future__ import annotations

import sys
import time
import zlib

import pytest
from builders import lzw_run, make_pdf, text_stream

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


# --- reliability case 20: the rest of the PDF DoS corpus, built here (nothing downloaded) ---------------------

GOOD = ["Normal text on the first page"]


def _bomb(case: str) -> dict:
    """make_pdf keyword arguments of one hostile page (page 2, after a good one)."""
    if case == "inline-image-without-EI":  # image data that never ends: the parser must stop at the stream's end
        data = text_stream(["Words before the image"]) + b"\nBI /W 1000 /H 1000 /BPC 8 /CS /G ID " + \
            bytes(range(256)).replace(b"EI", b"xx") * 8000
        return {"raw_pages": {1: ([], data)}}
    if case == "lzw-bomb":  # 230 KB → 300 MiB
        return {"raw_pages": {1: (["/LZWDecode"], lzw_run(32, 300 << 20))}}
    if case == "nested-flate-bomb":  # 1 KB → 300 KB → 300 MiB
        co = zlib.compressobj(1)
        inner = b"".join(co.compress(bytes(1 << 20)) for _ in range(300)) + co.flush()
        return {"raw_pages": {1: (["/FlateDecode", "/FlateDecode"], zlib.compress(inner, 9))}}
    assert case == "flate-over-lzw-bomb"
    return {"raw_pages": {1: (["/FlateDecode", "/LZWDecode"], zlib.compress(lzw_run(32, 300 << 20)))}}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["inline-image-without-EI", "lzw-bomb", "nested-flate-bomb", "flate-over-lzw-bomb"])
def test_hostile_content_stream_skips_its_page_within_limits(tmp_path, case):
    """Each hostile page ends, well inside the time budget and a 1 GiB address-space limit (a quarter of the
    default), as a `page-error` skip of that page; the good page is kept."""
    p = make_pdf(tmp_path / f"{case}.pdf", [GOOD, None], **_bomb(case))
    t = time.monotonic()
    doc = load(p, IngestOptions(pdf_timeout_s=30, pdf_memory_bytes=1 << 30))
    assert time.monotonic() - t < 30
    assert [s.origin.page_index for s in doc.sections] == [0] and "Normal text" in doc.sections[0].text
    assert [(s.path, s.reason) for s in doc.skipped] == [(f"{case}.pdf p. 2", "page-error")]
    assert doc.skipped[0].detail.startswith(("LimitReachedError", "PdfReadError"))


def _looping_outline(w) -> None:
    """First ⇄ Second as each other's /Next and /Prev, and a child whose /First and /Last are its parent."""
    from pypdf.generic import NameObject, NumberObject

    first = w.add_outline_item(title="First", page_number=0)
    second = w.add_outline_item(title="Second", page_number=1)
    second.get_object()[NameObject("/Next")] = first
    first.get_object()[NameObject("/Prev")] = second
    child = w.add_outline_item(title="Child", page_number=1, parent=first).get_object()
    child[NameObject("/First")], child[NameObject("/Last")] = first, first
    child[NameObject("/Count")] = NumberObject(1)


@pytest.mark.timeout(60)
def test_outline_loop_ends_and_titles_stay_usable(tmp_path):
    p = make_pdf(tmp_path / "loop.pdf", [GOOD, ["Text of the second page"]], edit=_looping_outline)
    t = time.monotonic()
    doc = load(p, IngestOptions(pdf_timeout_s=30))
    assert time.monotonic() - t < 30
    assert [s.origin.title for s in doc.sections] == ["First", "Child"]  # each item read once, in order
    assert doc.skipped == []


XMP_LAUGHS = ('<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><!DOCTYPE x [<!ENTITY lol "lol">'
              + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 10))
              + ']><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>&lol9;</dc:title>'
              '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>')


def _xmp_bomb(w) -> None:
    from pypdf.generic import DecodedStreamObject, NameObject

    meta = DecodedStreamObject()
    meta.set_data(XMP_LAUGHS.encode())
    meta[NameObject("/Type")], meta[NameObject("/Subtype")] = NameObject("/Metadata"), NameObject("/XML")
    w._root_object[NameObject("/Metadata")] = w._add_object(meta)


@pytest.mark.timeout(60)
def test_xmp_billion_laughs_is_never_expanded(tmp_path):
    """The extraction never parses XMP metadata, so a billion-laughs packet costs nothing and reaches no text."""
    p = make_pdf(tmp_path / "xmp.pdf", [GOOD, ["Text of the second page"]], edit=_xmp_bomb)
    t = time.monotonic()
    doc = load(p, IngestOptions(pdf_timeout_s=30, pdf_memory_bytes=1 << 30))
    assert time.monotonic() - t < 30
    assert len(doc.sections) == 2 and "lol" not in doc.joined() and doc.skipped == []


@pytest.mark.timeout(60)
def test_hostile_pdfs_in_a_folder_leave_the_rest_of_the_batch(tmp_path):
    """A folder (the product's batch of documents) with hostile PDFs among good files: folders never parse
    PDFs, so each is a `binary` skip — also one disguised under a text suffix — and every good file is read."""
    root = tmp_path / "batch"
    for d in ("docs", "src"):
        (root / d).mkdir(parents=True)
    make_pdf(root / "bomb.pdf", [GOOD, None], **_bomb("lzw-bomb"))
    make_pdf(root / "docs" / "inline.pdf", [GOOD, None], **_bomb("inline-image-without-EI"))
    (root / "disguised.txt").write_bytes((root / "bomb.pdf").read_bytes())
    (root / "README.md").write_text("# Batch\nThe good readme text.\n")
    (root / "src" / "main.py").write_text("print('the good code')\n")
    t = time.monotonic()
    doc = load(root, IngestOptions(use_git=False))
    assert time.monotonic() - t < 10
    assert {s.path: s.reason for s in doc.skipped} == {"bomb.pdf": "binary", "docs/inline.pdf": "binary",
                                                       "disguised.txt": "binary"}
    text = doc.joined()
    assert "The good readme text." in text and "the good code" in text


# --- reliability case 21: AES without the cryptography package ---------------------------------------------

def _worker_without(monkeypatch, *modules: str) -> None:
    """Run the real extraction child with `modules` made unimportable (as if not installed)."""
    hide = "; ".join(f"sys.modules[{m!r}] = None" for m in modules)
    code = (f"import runpy, sys; {hide}; sys.argv = [{str(pdfmod.WORKER)!r}]; "
            f"runpy.run_path({str(pdfmod.WORKER)!r}, run_name='__main__')")
    monkeypatch.setattr(pdfmod, "worker_command", lambda: [sys.executable, "-I", "-c", code])


@pytest.mark.timeout(60)
def test_aes_without_cryptography_says_what_to_install(tmp_path, monkeypatch):
    """AES needs the 'cryptography' package (pypdf's fallback has only RC4): the message says which package
    to install — `pypdf[crypto]`, deliberately, not a combllama extra — with or without a password. RC4 still
    opens without it."""
    _worker_without(monkeypatch, "cryptography", "Crypto")
    message = r"aes.pdf: encrypted with AES, which needs the 'cryptography' package \(pip install 'pypdf\[crypto\]'\)$"
    aes = make_pdf(tmp_path / "aes.pdf", [["Secret but openable text"]], user_password="")
    with pytest.raises(SourceError, match=message):
        load(aes)
    locked = make_pdf(tmp_path / "aes.pdf", [["Locked text"]], user_password="hunter2")
    with pytest.raises(SourceError, match=message):
        load(locked, IngestOptions(password="hunter2"))
    rc4 = make_pdf(tmp_path / "rc4.pdf", [["Secret but openable text"]], user_password="", algorithm="RC4-128")
    assert "openable" in load(rc4).sections[0].text


@pytest.mark.timeout(60)
def test_missing_pypdf_is_a_clean_error(tmp_path, monkeypatch):
    _worker_without(monkeypatch, "pypdf")
    with pytest.raises(SourceError, match=r"plain.pdf: cannot read PDFs: .*pypdf.* \(pip install 'pypdf\[crypto\]'\)"):
        load(make_pdf(tmp_path / "plain.pdf", [GOOD]))
