"""PDF text extraction, run as a child process by ingest/pdf.py: never imported by the parent.

Reads one JSON request on stdin, writes one JSON answer on stdout. It limits its own address space
and CPU time before touching the file, so a hostile PDF can exhaust only this process. Stdlib and
pypdf only; it must run as a plain script (`python -I _pdf_worker.py`), so no package imports.
"""
from __future__ import annotations

import json
import sys

MAX_OUTLINE_ITEMS = 10_000  # outline loops and giant outlines end here, not in the time limit


def _limit(memory_bytes: int, cpu_seconds: int) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX: the parent's wall-clock timeout still applies
        return
    for what, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds)):
        try:
            soft, hard = resource.getrlimit(what)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(what, (value, hard))
        except (ValueError, OSError):  # pragma: no cover - a stricter limit is already in place
            pass


def _image_count(page) -> int:
    try:
        res = page.get("/Resources")
        res = res.get_object() if res is not None else None
        xobjects = res.get("/XObject") if res is not None else None
        if xobjects is None:
            return 0
        xobjects = xobjects.get_object()
        return sum(1 for k in list(xobjects.keys())[:1000] if xobjects[k].get_object().get("/Subtype") == "/Image")
    except Exception:  # noqa: BLE001 - an unreadable resource dict just means "unknown"
        return 0


def _outline(reader) -> list[list]:
    """[[page_index, title], ...] of the outline, flattened, capped."""
    out: list[list] = []
    stack = [iter(reader.outline)]
    seen = 0
    while stack and seen < MAX_OUTLINE_ITEMS:
        try:
            item = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        seen += 1
        if isinstance(item, list):
            if len(stack) < 64:
                stack.append(iter(item))
            continue
        try:
            page = reader.get_destination_page_number(item)
        except Exception:  # noqa: BLE001 - a broken destination drops one title, not the document
            continue
        if page is not None and page >= 0 and getattr(item, "title", None):
            out.append([page, str(item.title)[:300]])
    return out


def extract(request: dict) -> dict:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    reader = PdfReader(request["path"], strict=False)
    encrypted = bool(reader.is_encrypted)
    if encrypted:
        try:
            opened = reader.decrypt("")
            if not opened:
                if request.get("password") is None:
                    return {"ok": False, "kind": "password-needed"}
                if not reader.decrypt(request["password"]):
                    return {"ok": False, "kind": "password-wrong"}
        except DependencyError as e:
            return {"ok": False, "kind": "crypto", "message": str(e)}
    try:
        labels = list(reader.page_labels)
    except Exception:  # noqa: BLE001 - a broken /PageLabels tree: fall back to page numbers
        labels = []
    pages = []
    for i, page in enumerate(reader.pages):
        entry: dict = {"index": i, "label": labels[i] if i < len(labels) else str(i + 1)}
        try:
            entry["text"] = page.extract_text() or ""
        except MemoryError:
            raise
        except DependencyError as e:  # AES streams without `cryptography`: every page would fail the same way
            return {"ok": False, "kind": "crypto", "message": str(e)}
        except Exception as e:  # noqa: BLE001 - one bad page is a Skip, not a failed book
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
        entry["images"] = _image_count(page)
        pages.append(entry)
    try:
        outline = _outline(reader)
    except Exception:  # noqa: BLE001 - titles are a convenience
        outline = []
    return {"ok": True, "encrypted": encrypted, "pages": pages, "outline": outline}


def main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        # Imported before the limits: a library that cannot load is not the PDF's fault.
        import pypdf  # noqa: F401
        import pypdf.errors  # noqa: F401
    except ImportError as e:
        sys.stdout.write(json.dumps({"ok": False, "kind": "dependency", "message": str(e)}))
        return 0
    _limit(int(request["memory_bytes"]), int(request["cpu_seconds"]))
    try:
        answer = extract(request)
    except MemoryError:
        answer = {"ok": False, "kind": "memory", "message": "memory limit reached"}
    except ImportError as e:  # under RLIMIT_AS a lazy import fails to map its shared object
        answer = {"ok": False, "kind": "memory", "message": f"could not load a module: {e}"[:300]}
    except RecursionError:
        answer = {"ok": False, "kind": "malformed", "message": "nesting too deep"}
    except Exception as e:  # noqa: BLE001 - any parser failure is reported as one line
        answer = {"ok": False, "kind": "malformed", "message": f"{type(e).__name__}: {e}"[:500]}
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
