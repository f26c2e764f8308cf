"""Bytes to text: strict UTF-8 (BOM aware), then UTF-16 by BOM, then charset detection, then
replacement with a counted warning. Never "decode as latin-1", which accepts every byte string."""
from __future__ import annotations

import codecs


def decode_text(data: bytes, display: str) -> tuple[str, list[str]]:
    """Return (text with CRLF normalised, warnings)."""
    warnings: list[str] = []
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = data.decode("utf-16", errors="replace")
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = _detect(data)
            if text is None:
                text = data.decode("utf-8", errors="replace")
                n = text.count("\ufffd")
                warnings.append(f"{display}: {n} invalid byte sequence(s) replaced")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""), warnings


def _detect(data: bytes) -> str | None:
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    best = from_bytes(data).best()
    if best is None or best.encoding in ("utf_8", "ascii"):
        return None
    return str(best)
