"""XML parsing for untrusted files (EPUB container, OPF, NCX): defusedxml over the stdlib parser,
so entity declarations, external entities and DTD fetching are refused (no XXE, no billion laughs);
depth is capped. Knows nothing about EPUB; it only turns bytes into an ElementTree or a one-line error.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

MAX_DEPTH = 256


class XmlError(ValueError):
    """The document is not acceptable XML; the message is one line."""


def parse_xml(data: bytes, what: str) -> ET.Element:
    try:
        root = DET.fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise XmlError(f"{what}: refused unsafe XML ({type(e).__name__}: entity or external reference)") from None
    except ET.ParseError as e:
        raise XmlError(f"{what}: malformed XML ({e})") from None
    except RecursionError:
        raise XmlError(f"{what}: XML nested too deeply") from None
    _check_depth(root, what)
    return root


def _check_depth(root: ET.Element, what: str) -> None:
    stack = [(root, 1)]
    while stack:
        el, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise XmlError(f"{what}: XML nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in el)


def local(tag: str) -> str:
    """Tag without its namespace: '{http://www.idpf.org/2007/opf}item' → 'item'."""
    return tag.rsplit("}", 1)[-1]
