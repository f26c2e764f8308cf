"""Small real inputs built at test time: PDFs (pypdf), EPUBs (zipfile), repositories (files, git)."""
from __future__ import annotations

import zipfile
from pathlib import Path

from pypdf import PdfWriter
from pypdf.generic import (ArrayObject, DecodedStreamObject, DictionaryObject, NameObject, NumberObject,
                           StreamObject)


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def text_stream(lines: list[str]) -> bytes:
    ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
    for line in lines:
        ops.append(f"({_escape(line)}) Tj T*")
    ops.append("ET")
    return "\n".join(ops).encode("latin-1")


def make_pdf(path: Path, pages: list[list[str] | None], *, labels: list[tuple[int, int, str, str | None, int]] = (),
             user_password: str | None = None, owner_password: str = "owner", image_pages: tuple[int, ...] = (),
             outline: list[tuple[str, int]] = (), flate_pages: dict[int, bytes] | None = None,
             raw_pages: dict[int, tuple[list[str], bytes]] | None = None, edit=None,
             algorithm: str = "AES-128") -> Path:
    """pages[i] = lines of text, or None for a page without text. labels: (start, end, style, prefix, first).
    flate_pages: page index → already deflated content stream bytes (decompression bombs). raw_pages: page
    index → (filter names, encoded bytes) of its content stream. edit(writer): last changes before writing."""
    w = PdfWriter()
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    font_ref = w._add_object(font)
    for i, lines in enumerate(pages):
        page = w.add_blank_page(612, 792)
        resources = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font_ref})})
        content = b""
        if i in image_pages:
            img = StreamObject()
            img.update({NameObject("/Type"): NameObject("/XObject"), NameObject("/Subtype"): NameObject("/Image"),
                        NameObject("/Width"): NumberObject(2), NameObject("/Height"): NumberObject(2),
                        NameObject("/ColorSpace"): NameObject("/DeviceGray"),
                        NameObject("/BitsPerComponent"): NumberObject(8)})
            img.set_data(b"\x00\xff\xff\x00")
            resources[NameObject("/XObject")] = DictionaryObject({NameObject("/Im0"): w._add_object(img)})
            content += b"q 500 0 0 700 50 50 cm /Im0 Do Q\n"
        if lines:
            content += text_stream(lines)
        if flate_pages and i in flate_pages:
            stream = StreamObject()
            stream._data = flate_pages[i]
            stream[NameObject("/Filter")] = NameObject("/FlateDecode")
        elif raw_pages and i in raw_pages:
            filters, stream = raw_pages[i][0], StreamObject()
            stream._data = raw_pages[i][1]
            if filters:
                stream[NameObject("/Filter")] = ArrayObject([NameObject(f) for f in filters])
        else:
            stream = DecodedStreamObject()
            stream.set_data(content)
        page[NameObject("/Contents")] = w._add_object(stream)
        page[NameObject("/Resources")] = resources
    for start, end, style, prefix, first in labels:
        w.set_page_label(start, end, style=style, prefix=prefix, start=first)
    for title, page_no in outline:
        w.add_outline_item(title=title, page_number=page_no)
    if edit is not None:
        edit(w)
    if user_password is not None:
        w.encrypt(user_password=user_password, owner_password=owner_password, algorithm=algorithm)
    with open(path, "wb") as f:
        w.write(f)
    return path


def lzw_run(byte: int, n: int) -> bytes:
    """PDF LZWDecode data of `n` copies of `byte`, built from its codes (an LZW bomb: ~1,300:1, the most the
    code table allows; 300 MiB take about 230 KB). Codes and packing are those of pypdf's encoder (whose
    own packer never trims its bit buffer: quadratic at this size)."""
    codes, longest, left, next_code = [256], 1, n, 258  # clear-table first; code 256 + j is a run of length j
    while left:
        take = min(longest, left)
        codes.append(byte if take == 1 else 256 + take)
        left -= take
        if left:
            if next_code <= 4095:
                longest, next_code = take + 1, next_code + 1
            else:  # table full: clear it and start again from single bytes
                codes.append(256)
                longest, next_code = 1, 258
    codes.append(257)  # end of data
    out, buf, nbits, width, next_code = bytearray(), 0, 0, 9, 258
    for code in codes:  # high-order bit first; the width grows as the decoder's table will
        buf, nbits = (buf << width) | code, nbits + width
        while nbits >= 8:
            nbits -= 8
            out.append((buf >> nbits) & 0xFF)
        buf &= (1 << nbits) - 1
        if code == 256:
            width, next_code = 9, 258
        elif code != 257:
            next_code += 1
            if next_code > (1 << width) - 1 and width < 12:
                width += 1
    if nbits:
        out.append((buf << (8 - nbits)) & 0xFF)
    return bytes(out)


def make_epub(path: Path, chapters: list[tuple[str, str, str]], *, spine: list[str] | None = None,
              extra: dict[str, bytes | str] | None = None, nav: bool = True, ncx: bool = False,
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """chapters: (id, title, xhtml body). spine: ids in reading order (default: reverse of manifest order)."""
    spine = spine or [c[0] for c in reversed(chapters)]
    manifest = "\n".join(f'<item id="{cid}" href="text/{cid}.xhtml" media-type="application/xhtml+xml"/>'
                         for cid, _, _ in chapters)
    if nav:
        manifest += '\n<item id="nav" href="nav.xhtml" media-type="application/xhtml+xml" properties="nav"/>'
    if ncx:
        manifest += '\n<item id="ncx" href="toc.ncx" media-type="application/x-dtbncx+xml"/>'
    itemrefs = "\n".join(f'<itemref idref="{i}"/>' for i in spine)
    opf = f"""<?xml version="1.0" encoding="UTF-8"?>
<package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier="id">
<metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>Test Book</dc:title><dc:identifier id="id">x</dc:identifier></metadata>
<manifest>{manifest}</manifest>
<spine{' toc="ncx"' if ncx else ''}>{itemrefs}</spine>
</package>"""
    container = """<?xml version="1.0"?>
<container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">
<rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles>
</container>"""
    files: dict[str, bytes | str] = {"META-INF/container.xml": container, "OEBPS/content.opf": opf}
    for cid, title, body in chapters:
        files[f"OEBPS/text/{cid}.xhtml"] = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml">'
            f"<head><title>{cid} file</title></head><body>{body}</body></html>")
    if nav:
        links = "".join(f'<li><a href="text/{cid}.xhtml">{title}</a></li>' for cid, title, _ in chapters if title)
        files["OEBPS/nav.xhtml"] = (f'<html xmlns="http://www.w3.org/1999/xhtml" xmlns:epub="http://www.idpf.org/2007/ops">'
                                    f'<body><nav epub:type="toc"><ol>{links}</ol></nav></body></html>')
    if ncx:
        points = "".join(f'<navPoint id="n{k}"><navLabel><text>{title}</text></navLabel>'
                         f'<content src="text/{cid}.xhtml"/></navPoint>' for k, (cid, title, _) in enumerate(chapters))
        files["OEBPS/toc.ncx"] = (f'<?xml version="1.0"?><ncx xmlns="http://www.daisy.org/z3986/2005/ncx/">'
                                  f'<navMap>{points}</navMap></ncx>')
    files.update(extra or {})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("mimetype"), "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        for name, data in files.items():
            z.writestr(name, data, compress_type=compression)
    return path
