"""Bytes to text: strict UTF-8 (BOM aware), UTF-16/32 by BOM or by NUL pattern, then either UTF-8
with a few replaced bytes or charset detection, each with a counted warning. Never "decode as latin-1",
which accepts every byte string. Also the binary test used by the repository walk. Stdlib plus
charset-normalizer; knows nothing about files or sources.
"""
from __future__ import annotations

import codecs

PROBE_BYTES = 8192  # NUL probe window, as git and ripgrep use
_BOMS = (  # longest first: the UTF-32-LE BOM starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)
# A mostly-UTF-8 file with a stray byte is UTF-8: detection on it guesses a code page and garbles every
# non-ASCII character; so few errors → replace them, many → ask charset-normalizer.
_MAX_REPLACED_FRACTION = 0.005
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class BinaryData(ValueError):
    """The bytes are not text in any encoding we accept."""


def bom_encoding(data: bytes) -> str | None:
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    return None


def utf16_without_bom(data: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when the NULs sit on one parity only (ASCII-range UTF-16), else None."""
    sample = data[:PROBE_BYTES]
    if len(sample) < 4:
        return None
    sample = sample[: len(sample) // 2 * 2]
    even, odd = sample[0::2], sample[1::2]
    for name, zeros, other in (("utf-16-le", odd, even), ("utf-16-be", even, odd)):
        if zeros.count(0) >= 0.9 * len(zeros) and other.count(0) == 0:
            return name
    return None


def looks_binary(data: bytes) -> bool:
    """NUL in the first 8 KiB, unless a UTF-16/32 BOM or a UTF-16 NUL pattern explains it."""
    probe = data[:PROBE_BYTES]
    if b"\x00" not in probe:
        return False
    enc = bom_encoding(probe)
    if enc in ("utf-16", "utf-32"):
        return False
    return utf16_without_bom(data) is None


def decode_text(data: bytes, display: str, *, strict_binary: bool = False) -> tuple[str, list[str]]:
    """Return (text with CRLF normalised and NULs removed, warnings).

    With strict_binary=True, bytes that are no known text raise BinaryData instead of being replaced.
    """
    warnings: list[str] = []
    enc = bom_encoding(data) or utf16_without_bom(data)
    if enc is not None:
        text = data.decode(enc, errors="replace")
        if enc.startswith("utf-16") and enc != "utf-16":
            text = text.lstrip("\ufeff")
        n = text.count("\ufffd")
        if n:
            warnings.append(f"{display}: {n} invalid byte sequence(s) replaced ({enc})")
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            n = text.count("\ufffd")
            if n <= max(8, _MAX_REPLACED_FRACTION * len(data)):
                warnings.append(f"{display}: {n} invalid UTF-8 byte sequence(s) replaced with U+FFFD")
            else:
                detected = _detect(data)
                if detected is not None:
                    text, name = detected
                    warnings.append(f"{display}: not UTF-8; decoded as {name} (detected)")
                elif strict_binary:
                    raise BinaryData(f"{display}: not text in any detected encoding")
                else:
                    warnings.append(f"{display}: {n} invalid UTF-8 byte sequence(s) replaced with U+FFFD")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""), warnings


def count_bidi(text: str) -> int:
    """Bidirectional override characters (Trojan Source): kept, but reported."""
    return sum(text.count(ch) for ch in _BIDI)


def _detect(data: bytes) -> tuple[str, str] | None:
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # pragma: no cover - a declared dependency
        return None
    best = from_bytes(data).best()
    if best is None or best.encoding in ("utf_8", "ascii"):
        return None
    try:
        return data.decode(best.encoding, errors="replace"), best.encoding
    except LookupError:  # pragma: no cover - charset-normalizer names only codecs Python has
        return None
