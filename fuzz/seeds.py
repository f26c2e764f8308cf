"""Write the seed corpora under fuzz/corpus/<target>/ (small, deterministic; committed).

    .venv/bin/python fuzz/seeds.py

The full harness merges what its fuzzing runs found into the same folders (libFuzzer -merge=1,
so only inputs that add coverage are kept).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests" / "ingest"))


def _put(target: str, name: str, data: bytes) -> None:
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def memory_seeds(tmp: Path) -> None:
    import torch
    from safetensors.torch import save

    from combllama.core.memory.bundle import MemoryWriter

    header = {"name": "seed", "model": {"fingerprint": "cmfp1:seed", "n_layers": 2, "n_kv_heads": 1, "head_dim": 2},
              "method": {"name": "full", "version": 1, "params": {}}, "chunking": {"chunk_tokens": 4},
              "source": {"name": "seed.md", "kind": "markdown", "sha256": "0" * 64},
              "positions": {"logical_length": 8, "layout": "original"}, "content_key": "seed"}
    g = torch.Generator().manual_seed(0)
    with MemoryWriter.create(tmp / "seed", header, list(range(8))) as w:
        for s in (0, 4):
            w.add_chunk(s, s + 4, "0" * 64, [{"path": "seed.md", "lines": [1, 2]}],
                        {"k": torch.randn(2, 1, 4, 2, generator=g), "v": torch.randn(2, 1, 4, 2, generator=g)})
        w.seal()
    root = tmp / "seed"
    _put("manifest", "sealed.json", (root / "MANIFEST.json").read_bytes())
    _put("manifest", "empty-object", b"{}")
    _put("manifest", "format-only", b'{"format":"combllama-memory","format_version":1}')
    chunk = (root / w.manifest["chunks"][0]["file"]).read_bytes()
    for target in ("st_header", "chunk"):
        _put(target, "chunk.safetensors", chunk)
        _put(target, "tokens.safetensors", (root / "tokens.safetensors").read_bytes())
        _put(target, "mixed.safetensors", save({"a": torch.zeros(3, dtype=torch.bfloat16),
                                                "b": torch.arange(4, dtype=torch.int32),
                                                "c": torch.ones(2, 2, dtype=torch.float16)}))
    _put("st_header", "json-dup", b'{"a":1,"a":2}')


def document_seeds(tmp: Path) -> None:
    from builders import make_epub, make_pdf

    md = (ROOT / "samples" / "lighthouse.md").read_text()[:1500]
    _put("text", "lighthouse.md", md.encode())
    _put("text", "utf16.md", "# Title\n\nsome text\n".encode("utf-16"))
    _put("text", "bidi.md", "# a\n\u202eevil\u202c \x1b[2J\n".encode())
    _put("text", "latin1.md", "caf\xe9 na\xefve\n".encode("latin-1"))
    _put("html", "page.html", b"<!doctype html><html><head><title>T</title><style>p{}</style><script>x()</script>"
         b"</head><body><nav><a href='#'>Home</a></nav><main><h1>Keeper</h1><p>The lamp &amp; the light."
         b"</p></main><footer>c</footer></body></html>")
    _put("html", "subset.html", b'<!DOCTYPE html [<!ENTITY x SYSTEM "file:///etc/passwd">]><html><body><p>&x;</p>'
         b"</body></html>")
    epub = make_epub(tmp / "b.epub", [("c1", "One", "<h1>One</h1><p>First chapter.</p>"),
                                      ("c2", "Two", "<p>Second &amp; last.</p>")], spine=["c1", "c2"], ncx=True)
    _put("epub", "book.epub", epub.read_bytes())
    pdf = make_pdf(tmp / "d.pdf", [["Hello keeper", "second line"], ["page two"]], outline=[("Start", 0)])
    _put("pdf", "two-pages.pdf", pdf.read_bytes())
    _put("repo", "small", b"README.md\x01# hi\n\0src/a.py\x01print(1)\n\0D docs\0docs/x.txt\x01text")
    _put("repo", "links", b"a.txt\x01A\0L up\x01..\0L self\x01.\0L pw\x01/etc/passwd\0"
         b".gitignore\x01*.log\n\0b.log\x01x")


def main() -> None:
    with tempfile.TemporaryDirectory() as t:
        memory_seeds(Path(t))
        document_seeds(Path(t))
    for d in sorted((HERE / "corpus").iterdir()):
        files = list(d.iterdir())
        print(f"{d.name}: {len(files)} files, {sum(f.stat().st_size for f in files):,} bytes")


if __name__ == "__main__":
    main()
