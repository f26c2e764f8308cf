"""EPUB books: container.xml → OPF → spine order, one Section per spine document, titled from the
nav document or NCX (else the chapter's first heading or <title>).

The zip is read under caps (safezip), metadata XML through defusedxml (safexml), chapters through
the stdlib html.parser extractor (htmltext), so no DTD or entity is ever loaded. DRM-protected books
are refused with a reason. Knows nothing about tokens or models.
"""
from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import unquote, urldefrag

from .base import IngestOptions
from .decode import decode_text
from .document import Document, Origin, Section, Skip, sha256_file
from .errors import SourceError
from .htmltext import extract_html, nav_links
from .safexml import XmlError, local, parse_xml
from .safezip import SafeZip, escape_name, unsafe_name

EPUB_MIMETYPE = b"application/epub+zip"
# Font obfuscation (IDPF, Adobe) is not DRM: the text itself is readable.
_FONT_OBFUSCATION = {"http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC"}
_HTML_TYPES = {"application/xhtml+xml", "text/html", "application/xml", "text/xml"}


class EpubSource:
    name = "epub"
    suffixes = (".epub",)

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in self.suffixes

    def read(self, path: Path, options: IngestOptions) -> Document:
        size = path.stat().st_size
        if size > options.max_document_bytes:
            raise SourceError(f"{path.name}: {size:,} bytes is over the {options.max_document_bytes:,}-byte limit "
                              f"(max_document_bytes)")
        z = SafeZip.open(path, options)
        try:
            return _read(path, z, options)
        except XmlError as e:
            raise SourceError(f"{path.name}: {e}") from None
        finally:
            z.close()


def _read(path: Path, z: SafeZip, options: IngestOptions) -> Document:
    name = path.name
    warnings: list[str] = []
    skipped = list(z.skipped)
    if "mimetype" in z.members and z.read("mimetype").strip() != EPUB_MIMETYPE:
        warnings.append(f"{name}: mimetype entry is not {EPUB_MIMETYPE.decode()}")
    _refuse_drm(name, z)
    if "META-INF/container.xml" not in z.members:
        raise SourceError(f"{name}: not an EPUB (no META-INF/container.xml)")
    container = parse_xml(z.read("META-INF/container.xml"), f"{name}:META-INF/container.xml")
    opf_path = next((el.get("full-path") for el in container.iter() if local(el.tag) == "rootfile"
                     and el.get("full-path")), None)
    if not opf_path or unsafe_name(opf_path) or opf_path not in z.members:
        raise SourceError(f"{name}: container.xml names no readable package document ({opf_path!r})")
    opf = parse_xml(z.read(opf_path), f"{name}:{opf_path}")
    base = posixpath.dirname(opf_path)

    manifest: dict[str, tuple[str, str, str]] = {}  # id → (resolved href, media type, properties)
    spine: list[tuple[str, bool]] = []  # (idref, linear)
    toc_id = None
    for el in opf.iter():
        tag = local(el.tag)
        if tag == "item" and el.get("id") and el.get("href") is not None:
            manifest[el.get("id")] = (_resolve(base, el.get("href")), el.get("media-type") or "",
                                      el.get("properties") or "")
        elif tag == "spine":
            toc_id = el.get("toc")
        elif tag == "itemref" and el.get("idref"):
            spine.append((el.get("idref"), (el.get("linear") or "yes").lower() != "no"))
    if not spine:
        raise SourceError(f"{name}: the package document has an empty spine")

    titles = _toc_titles(name, z, manifest, toc_id)
    # Reading order: linear items in spine order, then auxiliary (linear="no") ones.
    ordered = [i for i, lin in spine if lin] + [i for i, lin in spine if not lin]
    sections: list[Section] = []
    seen: set[str] = set()
    for idref in ordered:
        if idref not in manifest:
            skipped.append(Skip(f"{name}:#{escape_name(idref)}", "missing", "spine entry not in the manifest"))
            continue
        href, media, _ = manifest[idref]
        where = f"{name}:{escape_name(href)}"
        if href in seen:
            continue
        seen.add(href)
        if unsafe_name(href):
            skipped.append(Skip(where, "zip-unsafe", unsafe_name(href) or ""))
            continue
        if href not in z.members:
            skipped.append(Skip(where, "missing", "listed in the spine, absent from the archive"))
            continue
        if media and media not in _HTML_TYPES:
            skipped.append(Skip(where, "unsupported", f"media type {media}"))
            continue
        text, w = decode_text(z.read(href), where)
        warnings += w
        ex = extract_html(text, mode="full")
        if not ex.text.strip():
            skipped.append(Skip(where, "empty", "no text (image-only or blank chapter)"))
            continue
        title = titles.get(href) or ex.first_heading or ex.title
        sections.append(Section(ex.text, Origin(name, title=title)))
    if not sections:
        raise SourceError(f"{name}: no chapter has any text ({len(skipped)} skipped)")
    digest = sha256_file(path)
    return Document(name, "epub", sections, digest, skipped=skipped, warnings=warnings)


def _resolve(base: str, href: str) -> str:
    """Archive path of an href relative to `base`; '../' that leaves the archive root stays visible."""
    href = unquote(urldefrag(href)[0])
    joined = posixpath.normpath(posixpath.join(base, href)) if href else base
    return joined


def _refuse_drm(name: str, z: SafeZip) -> None:
    if "META-INF/rights.xml" in z.members:
        raise SourceError(f"{name}: DRM-protected (META-INF/rights.xml present); combllama cannot read encrypted "
                          f"books")
    if "META-INF/encryption.xml" not in z.members:
        return
    root = parse_xml(z.read("META-INF/encryption.xml"), f"{name}:META-INF/encryption.xml")
    encrypted = []
    for data in root.iter():
        if local(data.tag) != "EncryptedData":
            continue
        algorithm = next((el.get("Algorithm") for el in data.iter() if local(el.tag) == "EncryptionMethod"), None)
        uri = next((el.get("URI") for el in data.iter() if local(el.tag) == "CipherReference"), None)
        if algorithm not in _FONT_OBFUSCATION:
            encrypted.append(uri or "?")
    if encrypted:
        raise SourceError(f"{name}: DRM-protected (META-INF/encryption.xml encrypts {len(encrypted)} file(s), e.g. "
                          f"{escape_name(encrypted[0])}); combllama cannot read encrypted books")


def _toc_titles(name: str, z: SafeZip, manifest: dict, toc_id: str | None) -> dict[str, str]:
    """Archive path → chapter title, from the EPUB 3 nav document, else the EPUB 2 NCX."""
    titles: dict[str, str] = {}
    nav = next((href for href, _, props in manifest.values() if "nav" in props.split()), None)
    if nav and not unsafe_name(nav) and nav in z.members:
        text, _ = decode_text(z.read(nav), nav)
        for href, label in nav_links(text):
            target = _resolve(posixpath.dirname(nav), href)
            if label and target not in titles:
                titles[target] = label
    ncx = manifest.get(toc_id)[0] if toc_id in manifest else next(
        (href for href, media, _ in manifest.values() if media == "application/x-dtbncx+xml"), None)
    if not titles and ncx and not unsafe_name(ncx) and ncx in z.members:
        root = parse_xml(z.read(ncx), f"{name}:{ncx}")
        for point in root.iter():
            if local(point.tag) != "navPoint":
                continue
            label = next((" ".join("".join(el.itertext()).split()) for el in point.iter()
                          if local(el.tag) == "text"), "")
            src = next((el.get("src") for el in point.iter() if local(el.tag) == "content"), None)
            if src and label:
                titles.setdefault(_resolve(posixpath.dirname(ncx), src), label)
    return titles
