"""EPUB source: spine order and titles, and every hostile archive from reliability.md §2 items 22-24."""
from __future__ import annotations

import zipfile

import pytest
from builders import make_epub

from combllama.ingest import IngestOptions, SourceError, label, load

CHAPTERS = [("c1", "The Beginning", "<h1>One</h1><p>Alpha text.</p>"),
            ("c2", "The Middle", "<h1>Two</h1><p>Beta text.</p>"),
            ("c3", "", "<h2>Three heading</h2><p>Gamma text.</p>")]
XXE = '<?xml version="1.0"?><!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 10))
          + "]>")


def test_spine_order_not_manifest_order_with_nav_titles(tmp_path):
    doc = load(make_epub(tmp_path / "book.epub", CHAPTERS, spine=["c2", "c3", "c1"]))
    assert doc.kind == "epub"
    assert [s.origin.title for s in doc.sections] == ["The Middle", "Three heading", "The Beginning"]
    assert "Beta text." in doc.sections[0].text
    j = doc.joined()
    assert label(doc.span(j.index("Beta"), j.index("Beta") + 4)) == 'book.epub "The Middle"'


def test_ncx_titles_and_non_linear_items_last(tmp_path):
    p = make_epub(tmp_path / "old.epub", CHAPTERS, spine=["c1", "c2", "c3"], nav=False, ncx=True)
    with zipfile.ZipFile(p) as z:
        opf = z.read("OEBPS/content.opf").decode()
    opf = opf.replace('<itemref idref="c1"/>', '<itemref idref="c1" linear="no"/>')
    p2 = tmp_path / "old2.epub"
    with zipfile.ZipFile(p) as src, zipfile.ZipFile(p2, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, opf if info.filename == "OEBPS/content.opf" else src.read(info))
    doc = load(p2)
    assert [s.origin.title for s in doc.sections] == ["The Middle", "Three heading", "The Beginning"]


def test_xxe_in_package_document_is_refused(tmp_path):
    p = make_epub(tmp_path / "xxe.epub", CHAPTERS)
    p2 = tmp_path / "xxe2.epub"
    with zipfile.ZipFile(p) as src, zipfile.ZipFile(p2, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "OEBPS/content.opf":
                data = data.replace(b'<?xml version="1.0" encoding="UTF-8"?>', XXE.encode()).replace(
                    b"<dc:title>Test Book</dc:title>", b"<dc:title>&x;</dc:title>")
            dst.writestr(info, data)
    with pytest.raises(SourceError, match="refused unsafe XML"):
        load(p2)


def test_xxe_and_entities_in_chapters_are_never_expanded(tmp_path):
    body = "<p>before &x; after</p><p>&lol9;</p>"
    laughs = LAUGHS.replace('<?xml version="1.0"?>', "")
    p = make_epub(tmp_path / "ch.epub", [("c1", "One", body), ("c2", "Two", body)], spine=["c1", "c2"],
                  extra={"OEBPS/text/c1.xhtml": XXE + f"<html><body>{body}</body></html>",
                         "OEBPS/text/c2.xhtml": laughs + f"<html><body>{body}</body></html>"})
    doc = load(p)
    text = doc.joined()
    assert "root:x:0:0" not in text and "lollol" not in text
    assert doc.sections[0].text.startswith("before &x; after") and doc.sections[1].text.startswith("before")


def test_billion_laughs_in_container_is_refused_fast(tmp_path):
    container = LAUGHS + ('<container xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
                          '<rootfile full-path="&lol9;"/></rootfiles></container>')
    p = make_epub(tmp_path / "lol.epub", CHAPTERS, extra={"META-INF/container.xml": container})
    with pytest.raises(SourceError, match="refused unsafe XML"):
        load(p)


@pytest.mark.parametrize("extra, reason", [
    ({"META-INF/encryption.xml": '<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
      'xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:EncryptedData><enc:EncryptionMethod '
      'Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/><enc:CipherData><enc:CipherReference '
      'URI="OEBPS/text/c1.xhtml"/></enc:CipherData></enc:EncryptedData></encryption>'}, "encrypts 1 file"),
    ({"META-INF/rights.xml": "<rights/>"}, "rights.xml"),
])
def test_drm_is_refused_with_a_reason(tmp_path, extra, reason):
    with pytest.raises(SourceError, match=f"DRM-protected.*{reason}"):
        load(make_epub(tmp_path / "drm.epub", CHAPTERS, extra=extra))


def test_font_obfuscation_is_not_drm(tmp_path):
    enc = ('<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
           'xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:EncryptedData><enc:EncryptionMethod '
           'Algorithm="http://www.idpf.org/2008/embedding"/><enc:CipherData><enc:CipherReference '
           'URI="OEBPS/fonts/a.otf"/></enc:CipherData></enc:EncryptedData></encryption>')
    assert len(load(make_epub(tmp_path / "f.epub", CHAPTERS, extra={"META-INF/encryption.xml": enc})).sections) == 3


@pytest.mark.timeout(30)
def test_zip_bomb_ratio_is_refused(tmp_path):
    p = make_epub(tmp_path / "bomb.epub", CHAPTERS, extra={"OEBPS/big.bin": b"\0" * (20 * 1024 * 1024)})
    with pytest.raises(SourceError, match="compression ratio .* a zip bomb"):
        load(p)


def test_entry_and_total_caps(tmp_path):
    many = {f"OEBPS/x{i}.txt": "x" for i in range(60)}
    with pytest.raises(SourceError, match="entries is over the limit"):
        load(make_epub(tmp_path / "many.epub", CHAPTERS, extra=many), IngestOptions(zip_max_entries=50))
    p = make_epub(tmp_path / "big.epub", CHAPTERS, extra={"OEBPS/pad.txt": "y" * 5000})
    with pytest.raises(SourceError, match="zip_max_entry_bytes"):
        load(p, IngestOptions(zip_max_entry_bytes=4000))
    with pytest.raises(SourceError, match="zip_max_total_bytes"):
        load(p, IngestOptions(zip_max_total_bytes=6000))


def test_declared_size_lie_is_caught(tmp_path):
    p = make_epub(tmp_path / "lie.epub", CHAPTERS, compression=zipfile.ZIP_STORED)
    raw = bytearray(p.read_bytes())
    # Shrink the central directory's uncompressed size of chapter c2 to 10 bytes.
    name = b"OEBPS/text/c2.xhtml"
    cd = raw.rindex(b"PK\x01\x02", 0, raw.rindex(name))
    raw[cd + 24:cd + 28] = (10).to_bytes(4, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match="lie.epub: "):
        load(p)


def test_overlapping_entries_are_refused(tmp_path):
    """CVE-2024-0450: point chapter c2's central-directory record at chapter c1's local record."""
    p = make_epub(tmp_path / "overlap.epub", CHAPTERS)
    raw = bytearray(p.read_bytes())
    cds = {}
    for name in (b"OEBPS/text/c1.xhtml", b"OEBPS/text/c2.xhtml"):
        cds[name] = raw.rindex(b"PK\x01\x02", 0, raw.rindex(name))
    c1 = cds[b"OEBPS/text/c1.xhtml"]
    raw[cds[b"OEBPS/text/c2.xhtml"] + 42:cds[b"OEBPS/text/c2.xhtml"] + 46] = raw[c1 + 42:c1 + 46]
    p.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match=r"overlap\.epub: zip-unsafe: entries .* overlap"):
        load(p)
    assert load(make_epub(tmp_path / "fine.epub", CHAPTERS)).sections  # an ordinary EPUB has no overlap


def test_escaping_member_names_are_skipped(tmp_path):
    chapters = CHAPTERS + [("evil", "Evil", "<p>escaped</p>")]
    p = make_epub(tmp_path / "paths.epub", chapters, extra={"../../evil.xhtml": "<p>x</p>", "/etc/x": "y",
                                                            "C:\\x": "z", "a\nb": "n"})
    # The manifest entry for "evil" points outside the archive root.
    p2 = tmp_path / "paths2.epub"
    with zipfile.ZipFile(p) as src, zipfile.ZipFile(p2, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "OEBPS/content.opf":
                data = data.replace(b'href="text/evil.xhtml"', b'href="../../../evil.xhtml"')
            dst.writestr(info, data)
    doc = load(p2)
    assert [s.origin.title for s in doc.sections] == ["Three heading", "The Middle", "The Beginning"]
    unsafe = {s.path: s.detail for s in doc.skipped if s.reason == "zip-unsafe"}
    assert unsafe["paths2.epub:../../evil.xhtml"] == "parent-directory component"
    assert unsafe["paths2.epub:/etc/x"] == "absolute path"
    assert unsafe["paths2.epub:C:\\x"] == "absolute path"
    assert unsafe["paths2.epub:a\\nb"] == "control character in name"
    assert any(s.reason == "zip-unsafe" and "evil" in s.path for s in doc.skipped)


@pytest.mark.timeout(20)
def test_deep_nesting_and_quadratic_blowup_stay_linear(tmp_path):
    deep = "<div>" * 10000 + "deep text" + "</div>" * 10000
    quad = "<p>" + "&amp;" * 200000 + "</p>"
    doc = load(make_epub(tmp_path / "deep.epub", [("c1", "Deep", deep), ("c2", "Quad", quad)], spine=["c1", "c2"]))
    assert "deep text" in doc.sections[0].text and len(doc.sections[1].text) == 200000


def test_not_a_zip_and_no_container(tmp_path):
    bad = tmp_path / "bad.epub"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(SourceError, match="not a readable zip"):
        load(bad)
    p = tmp_path / "nocont.epub"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("mimetype", "application/epub+zip")
    with pytest.raises(SourceError, match="no META-INF/container.xml"):
        load(p)


# --- reliability case 22: 100k entries and bounded memory ----------------------------------------------------

def _many_entries_zip(path, n: int, declared: int | None = None):
    """An EPUB-looking zip of `n` stored entries (mimetype, then empty files), written directly: zipfile would
    take seconds. `declared`: the entry count the end record claims (zipfile never checks it)."""
    import struct
    import zlib

    local, central, at = [], [], 0
    for i in range(n):
        name, data = (b"mimetype", b"application/epub+zip") if i == 0 else (b"OEBPS/%06d.txt" % i, b"")
        crc = zlib.crc32(data)
        record = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0x21, crc, len(data), len(data), len(name),
                             0) + name + data
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, crc, len(data),
                                   len(data), len(name), 0, 0, 0, 0, 0, at) + name)
        local.append(record)
        at += len(record)
    directory = b"".join(central)
    count = min(n if declared is None else declared, 0xFFFF)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), at, 0)
    path.write_bytes(b"".join(local) + directory + end)
    return path


def _peak_bytes(fn) -> int:
    """Peak Python heap bytes allocated while `fn()` runs (its SourceError is expected and swallowed)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    except SourceError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.timeout(60)
def test_hundred_thousand_entries_are_refused_in_constant_memory(tmp_path):
    """100,000 entries (10.8 MB) is refused by the entry cap counted from the central directory's records
    before zipfile builds them (it took ~50 MiB and seconds): peak heap under 1 MiB, also when the end
    record lies about the count, and also for a file without the .epub suffix (content sniffing)."""
    import time

    for name, declared in (("many.epub", None), ("lying.epub", 10), ("many-no-suffix", None)):
        p = _many_entries_zip(tmp_path / name, 100_000, declared)
        with pytest.raises(SourceError, match=rf"{name}: zip-unsafe: more than 20,000 entries is over the limit"):
            load(p)
        t = time.monotonic()
        assert _peak_bytes(lambda: load(p)) < 1 << 20
        assert time.monotonic() - t < 5
    ok = _many_entries_zip(tmp_path / "fine.epub", 1_000)  # under the cap: zipfile reads it (and finds no book)
    with pytest.raises(SourceError, match="no META-INF/container.xml"):
        load(ok)


@pytest.mark.timeout(60)
def test_zip_bombs_are_refused_with_bounded_memory(tmp_path):
    """Each bomb is refused with a peak heap far below what it would inflate to: a 300 MiB high-ratio entry
    (refused from its declared sizes), a 64 MiB chapter whose declared size says 10 bytes (inflation stops at
    the declared size), and entries past the total cap (stops once the cap is passed)."""
    big = make_epub(tmp_path / "ratio.epub", CHAPTERS, extra={"OEBPS/big.bin": bytes(300 << 20)})
    assert _peak_bytes(lambda: load(big)) < 1 << 20
    lie = make_epub(tmp_path / "lie.epub", CHAPTERS[:1] + [("c2", "Two", "<p>" + "a" * (64 << 20) + "</p>")]
                    + CHAPTERS[2:], spine=["c1", "c2", "c3"])
    raw = bytearray(lie.read_bytes())
    name = b"OEBPS/text/c2.xhtml"
    cd = raw.rindex(b"PK\x01\x02", 0, raw.rindex(name))
    raw[cd + 24:cd + 28] = (10).to_bytes(4, "little")  # the central directory's uncompressed size
    lie.write_bytes(bytes(raw))
    with pytest.raises(SourceError, match="lie.epub: "):
        load(lie)
    assert _peak_bytes(lambda: load(lie)) < 2 << 20
    pads = {f"OEBPS/pad{i}.txt": "p" * (256 << 10) for i in range(40)}  # 10 MiB in 40 entries
    total = make_epub(tmp_path / "total.epub", CHAPTERS, extra=pads)
    options = IngestOptions(zip_max_total_bytes=1 << 20)
    with pytest.raises(SourceError, match="zip_max_total_bytes"):
        load(total, options)
    assert _peak_bytes(lambda: load(total, options)) < 2 << 20


# --- reliability case 23: parameter entities, external DTDs, one big entity, and no network -----------------

@pytest.fixture
def no_network(monkeypatch):
    """Every way Python code reaches the network fails and is recorded (resolving, connecting, urlopen)."""
    import socket
    import urllib.request

    attempts = []

    def refuse(what):
        def f(*a, **k):
            attempts.append((what, a[:2]))
            raise OSError(f"network disabled by the test ({what})")
        return f

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    with pytest.raises(OSError):  # the trap itself works
        socket.create_connection(("127.0.0.1", 9))
    attempts.clear()
    return attempts


PARAM_ENTITY = ('<?xml version="1.0"?><!DOCTYPE package [<!ENTITY % ext SYSTEM "http://127.0.0.1:9/evil.dtd"> '
                '%ext;<!ENTITY % file SYSTEM "file:///etc/passwd">]>')
EXTERNAL_DTD = '<?xml version="1.0"?><!DOCTYPE package SYSTEM "http://127.0.0.1:9/evil.dtd">'
BIG_ENTITY = f'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY big "{"A" * 100_000}">]>'


def _with_doctype(xml: str, doctype: str) -> str:
    return doctype + xml.split("?>", 1)[1] if xml.startswith("<?xml") else doctype + xml


@pytest.mark.timeout(30)
@pytest.mark.parametrize("doctype", [PARAM_ENTITY, EXTERNAL_DTD], ids=["parameter-entity", "external-dtd"])
def test_package_document_with_external_dtd_or_parameter_entities(tmp_path, no_network, doctype):
    """A parameter-entity external DTD in the package document is refused as unsafe XML; an external DTD
    subset alone is never fetched (the parser does not load DTDs). Nothing reaches the network."""
    from zipfile import ZipFile

    p = make_epub(tmp_path / "dtd.epub", CHAPTERS)
    with ZipFile(p) as z:
        opf = z.read("OEBPS/content.opf").decode()
    p = make_epub(tmp_path / "dtd.epub", CHAPTERS, extra={"OEBPS/content.opf": _with_doctype(opf, doctype)})
    if doctype is PARAM_ENTITY:
        with pytest.raises(SourceError, match="refused unsafe XML"):
            load(p)
    else:
        assert [s.origin.title for s in load(p).sections] == ["Three heading", "The Middle", "The Beginning"]
    assert no_network == []


@pytest.mark.timeout(30)
def test_chapters_and_html_with_dtds_and_one_big_entity_stay_data(tmp_path, no_network):
    """Chapters (and an HTML page) declaring parameter entities, an external DTD and one 100 KB entity used
    20,000 times: nothing is fetched or expanded (the text keeps `&big;` as written, 100 KB, not 2 GB) and
    the package document with the big entity is refused."""
    import time

    refs = "&big;" * 20_000
    chapters = [("c1", "One", f"<p>alpha {refs}</p>"), ("c2", "Two", "<p>beta &ext; gamma</p>")]
    p = make_epub(tmp_path / "ent.epub", chapters, spine=["c1", "c2"], extra={
        "OEBPS/text/c1.xhtml": BIG_ENTITY + f"<html><body><p>alpha {refs}</p></body></html>",
        "OEBPS/text/c2.xhtml": PARAM_ENTITY.replace("package", "html") + "<html><body><p>beta &ext; gamma</p></body></html>"})
    t = time.monotonic()
    doc = load(p)
    assert time.monotonic() - t < 10
    assert doc.sections[0].text.count("&big;") == 20_000 and "AAAA" not in doc.joined()
    assert len(doc.joined()) < 200_000 and "root:x:0:0" not in doc.joined()
    html = tmp_path / "page.html"
    html.write_text(EXTERNAL_DTD.replace("package", "html").replace('<?xml version="1.0"?>', "")
                    + f"<html><body><article><p>The page text {refs[:50]}</p></article></body></html>")
    assert "The page text" in load(html).joined()
    opf_big = make_epub(tmp_path / "opf.epub", CHAPTERS, extra={
        "OEBPS/content.opf": _with_doctype(_opf(tmp_path), BIG_ENTITY.replace('"p"', '"package"'))})
    with pytest.raises(SourceError, match="refused unsafe XML"):
        load(opf_big)
    assert no_network == []


def _opf(tmp_path) -> str:
    from zipfile import ZipFile

    with ZipFile(make_epub(tmp_path / "plain.epub", CHAPTERS)) as z:
        return z.read("OEBPS/content.opf").decode()


# --- reliability case 24: NUL in a member name; nothing is written anywhere ----------------------------------

def _nul_names(path, names: dict[str, str]):
    """Rewrite the members named in `names` (a placeholder of the same length) to their real names with NULs:
    zipfile cannot write a NUL in a name (it cuts the name there)."""
    raw = path.read_bytes()
    for placeholder, real in names.items():
        assert len(placeholder) == len(real)
        raw = raw.replace(placeholder.encode(), real.encode())
    path.write_bytes(raw)
    return path


def test_nul_in_a_member_name_is_reported_not_truncated(tmp_path):
    """zipfile cuts a name at its NUL, so "c1.xhtml\\0../../evil.sh" would pose as the chapter c1.xhtml; it is
    skipped as zip-unsafe under its whole name (escaped), and the real chapter is read."""
    p = make_epub(tmp_path / "nul.epub", CHAPTERS, extra={"OEBPS/text/c1.xhtml#../../evil.sh": "<p>EVIL</p>",
                                                          "OEBPS/x#.xhtml": "<p>EVIL TOO</p>"})
    _nul_names(p, {"OEBPS/text/c1.xhtml#../../evil.sh": "OEBPS/text/c1.xhtml\0../../evil.sh",
                   "OEBPS/x#.xhtml": "OEBPS/x\0.xhtml"})
    doc = load(p)
    unsafe = {s.path: s.detail for s in doc.skipped if s.reason == "zip-unsafe"}
    assert unsafe == {"nul.epub:OEBPS/text/c1.xhtml\\x00../../evil.sh": "control character in name",
                      "nul.epub:OEBPS/x\\x00.xhtml": "control character in name"}
    assert "Alpha text." in doc.joined() and "EVIL" not in doc.joined()


def test_reading_a_hostile_epub_writes_nothing(tmp_path, monkeypatch):
    """Members are read into memory, never extracted: after reading an EPUB whose names escape every way
    (../, absolute, drive, NUL, newline), the working directory, its parent, the temporary directory and
    the absolute target are exactly as before."""
    import os
    import tempfile
    import uuid

    marker = f"combllama-evil-{uuid.uuid4().hex}"
    absolute = f"/tmp/{marker}"
    cwd, tmp = tmp_path / "work" / "cwd", tmp_path / "tmpdir"
    cwd.mkdir(parents=True)
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    p = make_epub(tmp_path / "escape.epub", CHAPTERS, extra={
        f"../../{marker}": "x", f"../{marker}": "x", absolute: "x", f"C:\\{marker}": "x", f"a\n{marker}": "x",
        f"OEBPS/{marker}#.txt": "x"})
    _nul_names(p, {f"OEBPS/{marker}#.txt": f"OEBPS/{marker}\0.txt"})

    def snapshot():
        return sorted(str(q.relative_to(tmp_path)) for q in tmp_path.rglob("*")), sorted(os.listdir(tmp))

    before = snapshot()
    doc = load(p)
    assert len(doc.sections) == 3 and len([s for s in doc.skipped if s.reason == "zip-unsafe"]) == 6
    assert snapshot() == before
    assert not os.path.lexists(absolute) and not any(marker in n for n in os.listdir("/tmp"))
