"""HTML/XHTML markup → readable text with stdlib html.parser: no DTDs, no entity definitions, no
network, no recursion (an explicit stack, capped), so hostile markup costs linear time.

Used for EPUB chapters and as the HTML fallback when trafilatura is missing or finds nothing.
Knows nothing about files, zips or Documents.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

MAX_DEPTH = 256  # deeper nesting is flattened, not followed
_DROP_ALWAYS = frozenset({"script", "style", "template", "noscript", "svg", "math", "head", "object", "iframe"})
_DROP_MAIN = frozenset({"nav", "header", "footer", "aside", "form", "button", "select"})
_BLOCK = frozenset({"p", "div", "section", "article", "main", "blockquote", "pre", "table", "tr", "ul", "ol",
                    "dl", "dt", "dd", "figure", "figcaption", "h1", "h2", "h3", "h4", "h5", "h6", "li", "br",
                    "hr", "body", "html", "caption", "address", "details", "summary", "nav", "header", "footer",
                    "aside"})
_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source",
                   "track", "wbr", "param"})
_PARAGRAPH = frozenset({"p", "div", "section", "article", "main", "blockquote", "pre", "table", "ul", "ol", "dl",
                        "figure", "h1", "h2", "h3", "h4", "h5", "h6", "header", "footer", "nav", "aside"})
_HEADING = {f"h{i}": i for i in range(1, 7)}
_DOCTYPE_SUBSET = re.compile(r"<!DOCTYPE[^\[>]*\[", re.I)
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")


@dataclass
class Extracted:
    text: str
    title: str | None = None  # <title>
    first_heading: str | None = None  # first <h1>..<h3>
    links: list[tuple[str, str]] = field(default_factory=list)  # (href, text) inside <nav>/toc, in order


class _Extractor(HTMLParser):
    def __init__(self, drop: frozenset[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.drop = drop
        self.stack: list[str] = []
        self.dropping = 0  # depth inside a dropped element
        self.lines: list[str] = []
        self.buf: list[str] = []
        self.pre = 0
        self.title_parts: list[str] | None = None
        self.title: str | None = None
        self.heading_parts: list[str] | None = None
        self.first_heading: str | None = None
        self.link: list[str] | None = None
        self.href = ""
        self.links: list[tuple[str, str]] = []

    # Structure -----------------------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "title" and self.title is None:
            self.title_parts = []
        if tag in _VOID:
            if tag in ("br", "hr") and not self.dropping:
                self._flush()
            return
        if len(self.stack) >= MAX_DEPTH:
            return  # too deep: keep the text, stop tracking elements
        self.stack.append(tag)
        if self.dropping or tag in self.drop:
            self.dropping += 1
            return
        if tag in _PARAGRAPH:
            self._blank()
        elif tag in _BLOCK:
            self._flush()
        if tag == "pre":
            self.pre += 1
        if tag in ("td", "th") and "".join(self.buf).strip():
            self.buf.append(" | ")
        if tag in _HEADING:
            self.buf.append("#" * _HEADING[tag] + " ")
            if self.first_heading is None and _HEADING[tag] <= 3:
                self.heading_parts = []
        elif tag == "li":
            self.buf.append("- ")
        if tag == "a":
            self.link, self.href = [], dict(attrs).get("href") or ""

    def handle_startendtag(self, tag: str, attrs) -> None:
        if tag in ("br", "hr") and not self.dropping:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self.title_parts is not None:
            self.title = " ".join("".join(self.title_parts).split()) or None
            self.title_parts = None
        if tag in _VOID or tag not in self.stack:
            return
        # Close everything opened after `tag` too: real-world markup forgets end tags.
        while self.stack:
            top = self.stack.pop()
            if self.dropping:
                self.dropping -= 1
                if top == tag:
                    break
                continue
            self._close(top)
            if top == tag:
                break

    def _close(self, tag: str) -> None:
        if tag == "a" and self.link is not None:
            text = " ".join("".join(self.link).split())
            if self.href:
                self.links.append((self.href, text))
            self.link = None
        if tag in _HEADING and self.heading_parts is not None:
            self.first_heading = " ".join("".join(self.heading_parts).split()) or None
            self.heading_parts = None
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _PARAGRAPH:
            self._blank()
        elif tag in _BLOCK:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self.title_parts is not None:
            self.title_parts.append(data)
        if self.dropping:
            return
        if self.link is not None:
            self.link.append(data)
        if self.heading_parts is not None:
            self.heading_parts.append(data)
        if self.pre:
            parts = data.split("\n")
            for part in parts[:-1]:
                self.buf.append(part)
                self._flush(keep_blank=True)
            self.buf.append(parts[-1])
        else:
            self.buf.append(data)

    def _flush(self, keep_blank: bool = False) -> None:
        raw = "".join(self.buf)
        self.buf = []
        line = raw if self.pre else _SPACES.sub(" ", raw.replace("\n", " ")).strip()
        if line.strip("#- ") or (keep_blank and self.pre):
            self.lines.append(line)

    def _blank(self) -> None:
        self._flush()
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def result(self) -> Extracted:
        self._flush()
        out: list[str] = []
        for line in self.lines:
            if line == "" and (not out or out[-1] == ""):
                continue
            out.append(line)
        # Paragraph-level blocks read better with blank lines between them.
        text = "\n".join(out).strip("\n")
        return Extracted(text, self.title, self.first_heading, self.links)


def strip_doctype_subset(markup: str) -> str:
    """Remove a DOCTYPE's internal subset (entity declarations): html.parser would show its tail as text.

    Entities declared there are never expanded by anything here; `&x;` stays literal.
    """
    m = _DOCTYPE_SUBSET.search(markup, 0, 4096)
    if m is None:
        return markup
    end = markup.find("]>", m.end())
    end = markup.find(">", m.end()) if end < 0 else end + 1
    return markup[: m.start()] + markup[end + 1:] if end >= 0 else markup[: m.start()]


_ODD_DECLARATION = re.compile(r"<!(?!--|\[CDATA\[|doctype)", re.I)


def _parsed(markup: str, drop: frozenset) -> _Extractor:
    """The extractor after reading `markup`. Python 3.11's html.parser raises AssertionError on some
    malformed declarations (`<![NTITY ...`, found by atheris): then every `<!` that opens neither a comment,
    CDATA nor a DOCTYPE is read as text, and if even that fails, every `<!`."""
    for text in (markup, _ODD_DECLARATION.sub("&lt;!", markup), markup.replace("<!", "&lt;!")):
        p = _Extractor(drop)
        try:
            p.feed(text)
            p.close()
            return p
        except AssertionError:
            continue
    raise AssertionError("unreachable: markup without declarations parses")


def extract_html(markup: str, mode: str = "main") -> Extracted:
    """Visible text of `markup`; mode "main" also drops nav/header/footer/aside/forms."""
    drop = _DROP_ALWAYS | (_DROP_MAIN if mode == "main" else frozenset())
    return _parsed(strip_doctype_subset(markup), drop).result()


def nav_links(markup: str) -> list[tuple[str, str]]:
    """(href, text) of every link, in document order; for EPUB nav documents."""
    return _parsed(strip_doctype_subset(markup), frozenset({"script", "style", "head"})).links
