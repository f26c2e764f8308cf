"""Citations as the user sees them: the `Sources:` line on stderr and the records kept in sessions
and `--json` ({"doc", "path", "lines"|"pages"+"page_label"|"title", "label", "chunk", "share"})."""
from __future__ import annotations


def source_records(cited) -> list[dict]:
    """One record per source part of each cited chunk (a chunk may span files), best chunk first."""
    from ..ingest import label

    out = []
    for ref, share in cited:
        for part in ref.parts or [{"path": ref.memory}]:
            rec = {"doc": ref.memory, "path": part.get("path"), "label": label([part]), "chunk": ref.seq,
                   "share": round(float(share), 4)}
            if "lines" in part:
                rec["lines"] = list(part["lines"])
            if "pages" in part:
                rec["pages"] = list(part["pages"])
                rec["page_label"] = part["pages"][0]
            if part.get("title"):
                rec["title"] = part["title"]
            out.append(rec)
    return out


def sources_line(cited) -> str:
    """`Sources: lighthouse.md:7-12 (64%), book.pdf p. xii (21%)` ('' when nothing is cited)."""
    from ..ingest import label

    items = [f"{label(ref.parts) or ref.memory} ({share:.0%})" for ref, share in cited]
    return "Sources: " + ", ".join(items) if items else ""


def print_sources(cited) -> None:
    from .render import note

    line = sources_line(cited)
    if line:
        note(line)
