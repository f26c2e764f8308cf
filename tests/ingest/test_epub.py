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
