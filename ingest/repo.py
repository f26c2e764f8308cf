"""Code repositories (a directory): which files to read, then one Section per file.

`scan_repo` decides the file list from metadata only (git ls-files or a .gitignore-aware walk,
.combllamaignore, a default deny list, lstat types, size and count caps); `read_repo` reads exactly
those files (binary and minified detection, decoding) into a Document whose first Section is a
directory tree and whose other Sections start with a `==> path <==` marker. Every file left out gets
a Skip. Symlinks are not followed by default and special files are never opened.
Stdlib, pathspec and charset-normalizer (through decode); knows nothing about tokens or models.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pathspec

from .base import IngestOptions
from .decode import BinaryData, count_bidi, decode_text, looks_binary
from .document import Document, Origin, Section, Skip, skip_summary
from .errors import SourceError

IGNORE_FILE = ".combllamaignore"
GIT_TIMEOUT_S = 120
MINIFIED_MIN_CHARS = 2000  # short files with long lines (a URL table) are not "minified"

DENY_DIRS = frozenset({
    ".git", ".hg", ".svn", ".bzr", "_darcs", ".jj", "node_modules", "bower_components", ".venv", "venv",
    "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".tox", ".nox", ".eggs", ".gradle", ".next",
    ".nuxt", ".parcel-cache", ".terraform", "build", "dist", "target", "out", ".build", ".cache", "coverage",
    ".ipynb_checkpoints", ".idea", ".DS_Store"})
DENY_DIR_GLOBS = ("*.egg-info",)
DENY_FILES = frozenset({
    "package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml", "bun.lockb", "poetry.lock",
    "Pipfile.lock", "uv.lock", "pdm.lock", "Cargo.lock", "composer.lock", "Gemfile.lock", "go.sum",
    "packages.lock.json", "flake.lock", ".DS_Store", "Thumbs.db"})
DENY_FILE_GLOBS = ("*.min.js", "*.min.css", "*.min.mjs", "*.js.map", "*.css.map", "*.map", "*.lock", "*.pyc",
                   "*.pyo", "*-min.js", "*.bundle.js")
BINARY_SUFFIXES = frozenset(
    ".png .jpg .jpeg .gif .bmp .ico .icns .webp .tif .tiff .psd .xcf .heic .avif .pdf .zip .gz .tgz .bz2 .xz .zst "
    ".7z .rar .jar .war .ear .whl .egg .deb .rpm .dmg .iso .img .mp3 .mp4 .m4a .wav .ogg .flac .mov .avi .mkv "
    ".webm .woff .woff2 .ttf .otf .eot .sqlite .sqlite3 .db .bin .dat .npy .npz .pt .pth .ckpt .safetensors "
    ".gguf .onnx .pkl .pickle .parquet .arrow .feather .h5 .hdf5 .o .a .so .dylib .dll .exe .class .pyd .wasm "
    ".epub .docx .xlsx .pptx .odt".split())


@dataclass(frozen=True)
class FileEntry:
    """A file scan_repo chose to read. `rel` is the file system name ('/'-separated, maybe with surrogate
    escapes); `display` is its printable form, used in markers, citations and reports."""

    rel: str
    display: str
    size: int
    dev: int
    ino: int
    nlink: int = 1
    real: str | None = None  # target path of a followed symlink


@dataclass
class RepoScan:
    root: Path
    name: str  # display name of the root ("myrepo/")
    mode: str  # "git" or "walk"
    files: list[FileEntry] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def display_path(rel: str) -> str:
    """Printable path: undecodable bytes as \\xNN, control characters (newline, ESC, bidi) escaped."""
    s = os.fsencode(rel).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() and ch not in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
                   else ch.encode("unicode_escape").decode("ascii") for ch in s)


# Ignore rules ------------------------------------------------------------------------------------

class _Rules:
    """Per-directory ignore files, applied like git: each file relative to its own directory, nearest
    matching pattern wins, and nothing inside an excluded directory can be re-included."""

    def __init__(self, root: Path, names: tuple[str, ...]) -> None:
        self.root, self.names = root, names
        self.specs: dict[str, list[tuple[str, pathspec.GitIgnoreSpec]]] = {}
        self.warnings: list[str] = []

    def _load(self, d: str) -> list[tuple[str, pathspec.GitIgnoreSpec]]:
        if d not in self.specs:
            specs = []
            for name in self.names:
                p = self.root / d / name if d else self.root / name
                try:
                    st = os.lstat(p)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    with open(p, "rb") as f:
                        lines = f.read(1024 * 1024).decode("utf-8", "replace").splitlines()
                    specs.append((name, pathspec.GitIgnoreSpec.from_lines(lines)))
                except FileNotFoundError:
                    continue
                except (OSError, ValueError) as e:
                    self.warnings.append(f"{display_path(os.path.join(d, name))}: ignore file not used ({e})")
            self.specs[d] = specs
        return self.specs[d]

    def match(self, rel: str, is_dir: bool) -> str | None:
        """Name of the ignore file that excludes `rel` (its ancestors are assumed not excluded), else None."""
        parts = rel.split("/")
        verdict: tuple[bool, str] | None = None
        for i in range(len(parts)):
            d = "/".join(parts[:i])
            sub = "/".join(parts[i:]) + ("/" if is_dir else "")
            for name, spec in self._load(d):
                r = spec.check_file(sub)
                if r.include is not None:
                    verdict = (r.include, f"{d}/{name}" if d else name)
        return verdict[1] if verdict and verdict[0] else None

    def match_with_parents(self, rel: str, cache: dict[str, str | None]) -> tuple[str, str] | None:
        """(excluded path, ignore file) if `rel` or one of its directories is excluded (git listings)."""
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in cache:
                cache[d] = self.match(d, True)
            if cache[d]:
                return d + "/", cache[d]
        hit = self.match(rel, False)
        return (rel, hit) if hit else None


def _denied_dir(name: str) -> bool:
    return name in DENY_DIRS or any(fnmatch.fnmatchcase(name, g) for g in DENY_DIR_GLOBS)


def _denied_file(name: str) -> str | None:
    if name in DENY_FILES:
        return "lockfile or OS metadata"
    for g in DENY_FILE_GLOBS:
        if fnmatch.fnmatchcase(name, g):
            return f"matches {g}"
    return None


# Listing -----------------------------------------------------------------------------------------

def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE",
                                                            "GIT_CEILING_DIRECTORIES")}
    env["GIT_OPTIONAL_LOCKS"] = "0"  # never write into the user's repository
    env["LC_ALL"] = "C"
    return env


def _git(root: Path, *args: str) -> bytes | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=GIT_TIMEOUT_S,
                           env=_git_env(), stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def _git_listing(root: Path) -> tuple[list[str], list[str]] | None:
    """(files git would show, ignored paths with ignored directories collapsed), or None outside a work tree."""
    inside = _git(root, "rev-parse", "--is-inside-work-tree")
    if inside is None or inside.strip() != b"true":
        return None
    if _git(root, "check-ignore", "-q", ".") is not None:
        return None  # the folder is ignored by an enclosing repository (a pyenv tree): the user named it, so walk it
    files = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if files is None:
        return None
    ignored = _git(root, "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory") or b""
    split = lambda b: sorted({os.fsdecode(x) for x in b.split(b"\0") if x})  # noqa: E731
    return split(files), split(ignored)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


class _Scanner:
    def __init__(self, root: Path, options: IngestOptions) -> None:
        self.root, self.options = root, options
        self.root_real = os.path.realpath(root)
        self.scan = RepoScan(root, (root.resolve().name or str(root)) + "/", "walk")
        self.seen: set[tuple[int, int]] = set()
        self.dir_counts: dict[tuple[str, str], int] = {}  # (excluded dir, ignore file) → files under it

    def skip(self, rel: str, reason: str, detail: str = "") -> None:
        self.scan.skipped.append(Skip(display_path(rel), reason, detail))

    def consider(self, rel: str, st: os.stat_result | None = None) -> None:
        """lstat-level checks for one candidate file."""
        name = rel.rsplit("/", 1)[-1]
        if self.options.default_deny:
            why = _denied_file(name)
            if why:
                return self.skip(rel, "denied", f"default deny list ({why})")
        full = os.path.join(self.root, rel)
        if st is None:
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                return self.skip(rel, "missing", "listed by git, absent on disk")
            except OSError as e:
                return self.skip(rel, "unreadable", e.strerror or str(e))
        real = None
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(full)
            except OSError:
                target = "?"
            if not self.options.follow_symlinks:
                return self.skip(rel, "symlink", f"-> {display_path(target)} (symlinks are not followed)")
            real = os.path.realpath(full)
            if os.path.commonpath([self.root_real, real]) != self.root_real:
                return self.skip(rel, "symlink", f"-> {display_path(target)} points outside the root")
            try:
                st = os.stat(real)
            except OSError:
                return self.skip(rel, "symlink", f"-> {display_path(target)} is broken")
            if not stat.S_ISREG(st.st_mode):
                return self.skip(rel, "symlink", f"-> {display_path(target)} is a {_kind(st.st_mode)}, not followed")
        if stat.S_ISDIR(st.st_mode):
            return self.skip(rel, "submodule", "a nested repository or directory listed by git")
        if not stat.S_ISREG(st.st_mode):
            return self.skip(rel, "special-file", f"{_kind(st.st_mode)}; never opened")
        if (st.st_dev, st.st_ino) in self.seen:
            return self.skip(rel, "duplicate", "same file as another path (link)")
        suffix = os.path.splitext(name)[1].lower()
        if suffix in BINARY_SUFFIXES:
            return self.skip(rel, "binary", f"{suffix} file")
        if st.st_size > self.options.max_file_bytes:
            return self.skip(rel, "too-large", f"{st.st_size:,} bytes; limit {self.options.max_file_bytes:,} "
                                               f"(max_file_bytes)")
        self.seen.add((st.st_dev, st.st_ino))
        self.scan.files.append(FileEntry(rel, display_path(rel), st.st_size, st.st_dev, st.st_ino, st.st_nlink, real))

    def from_git(self, files: list[str], ignored: list[str]) -> None:
        self.scan.mode = "git"
        rules = _Rules(self.root, (IGNORE_FILE,))
        cache: dict[str, str | None] = {}
        denied_dirs: dict[str, int] = {}
        for rel in ignored:
            self.skip(rel.rstrip("/") + ("/" if rel.endswith("/") else ""), "ignored", "gitignore")
        for rel in files:
            parts = rel.split("/")
            if self.options.default_deny:
                hit = next((i for i, p in enumerate(parts[:-1]) if _denied_dir(p)), None)
                if hit is not None:
                    d = "/".join(parts[: hit + 1]) + "/"
                    denied_dirs[d] = denied_dirs.get(d, 0) + 1
                    continue
            excluded = rules.match_with_parents(rel, cache)
            if excluded and excluded[0] == rel:
                self.skip(rel, "ignored", excluded[1])
                continue
            if excluded:  # a whole excluded directory: one Skip with a count
                self._count_dir(*excluded)
                continue
            self.consider(rel)
        for d, n in sorted(denied_dirs.items()):
            self.skip(d, "denied", f"default deny list ({n} tracked file(s))")
        self.scan.skipped += self._dir_skips()
        self.scan.warnings += rules.warnings

    def _count_dir(self, d: str, why: str) -> None:
        self.dir_counts[(d, why)] = self.dir_counts.get((d, why), 0) + 1

    def _dir_skips(self) -> list[Skip]:
        return [Skip(display_path(d), "ignored", f"{why} ({n} file(s))") for (d, why), n in sorted(self.dir_counts.items())]

    def walk(self) -> None:
        rules = _Rules(self.root, (".gitignore", IGNORE_FILE))
        stack = [""]
        while stack:
            d = stack.pop()
            try:
                with os.scandir(os.path.join(self.root, d) if d else self.root) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self.skip(d + "/", "unreadable", e.strerror or str(e))
                continue
            subdirs = []
            for e in entries:
                rel = f"{d}/{e.name}" if d else e.name
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError as err:
                    self.skip(rel, "unreadable", err.strerror or str(err))
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if is_dir and self.options.default_deny and _denied_dir(e.name):
                    self.skip(rel + "/", "denied", "default deny list")
                    continue
                why = rules.match(rel, is_dir)
                if why:
                    self.skip(rel + ("/" if is_dir else ""), "ignored", why)
                    continue
                if is_dir:
                    subdirs.append(rel)
                else:
                    self.consider(rel, st)
            stack.extend(reversed(subdirs))
        self.scan.warnings += rules.warnings

    def caps(self) -> None:
        """Files in sorted order until the count or total-bytes cap; the rest are reported, not dropped."""
        self.scan.files.sort(key=lambda f: f.rel)
        kept, total, over = [], 0, 0
        for f in self.scan.files:
            if len(kept) >= self.options.max_files:
                self.skip(f.rel, "over-limit", f"file count limit {self.options.max_files:,} (max_files)")
            elif total + f.size > self.options.max_total_bytes:
                self.skip(f.rel, "over-limit", f"total size limit {self.options.max_total_bytes:,} bytes "
                                               f"(max_total_bytes)")
            else:
                kept.append(f)
                total += f.size
                continue
            over += 1
        if over:
            self.scan.warnings.append(f"{self.scan.name}: {over} file(s) left out by the file-count or total-size "
                                      f"limits")
        self.scan.files = kept
        links = [f.display for f in kept if f.nlink > 1]
        if links:
            self.scan.warnings.append(f"{self.scan.name}: {len(links)} hard-linked file(s) included; their content "
                                      f"may come from outside the folder: {', '.join(links[:5])}"
                                      + (" …" if len(links) > 5 else ""))


def scan_repo(root: str | Path, options: IngestOptions | None = None) -> RepoScan:
    """The files a load would read, and everything left out with its reason; reads no file contents
    except ignore files."""
    options = options or IngestOptions()
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not a directory")
    s = _Scanner(root, options)
    listing = _git_listing(root) if options.use_git else None
    if listing is not None:
        s.from_git(*listing)
    else:
        s.walk()
    s.caps()
    return s.scan


# Reading -----------------------------------------------------------------------------------------

def _read_entry(root: Path, f: FileEntry, options: IngestOptions) -> bytes | Skip:
    path = f.real or os.path.join(root, f.rel)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if f.real is None:
        flags |= getattr(os, "O_NOFOLLOW", 0)  # swapped for a link since the scan: refuse
    try:
        fd = os.open(path, flags)
    except OSError as e:
        return Skip(f.display, "changed", f"cannot open any more ({e.strerror or e})")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (f.dev, f.ino):
            return Skip(f.display, "changed", "replaced by another file since the scan")
        chunks, n = [], 0
        while n <= options.max_file_bytes:
            block = os.read(fd, min(1 << 20, options.max_file_bytes + 1 - n))
            if not block:
                break
            chunks.append(block)
            n += len(block)
        data = b"".join(chunks)
    except OSError as e:
        return Skip(f.display, "unreadable", e.strerror or str(e))
    finally:
        os.close(fd)
    if len(data) > options.max_file_bytes:
        return Skip(f.display, "too-large", f"grew past {options.max_file_bytes:,} bytes while being read")
    return data


def marker(display: str) -> str:
    """The first line of every file's Section; also the citation anchor the model sees."""
    return f"==> {display} <=="


def tree_text(name: str, paths: list[str]) -> str:
    """An indented directory tree of `paths` (sorted), under a heading line."""
    lines = [f"Directory tree of {name} ({len(paths)} file(s)):", name]
    prev: list[str] = []
    for p in paths:
        parts = p.split("/")
        common = 0
        while common < min(len(prev), len(parts) - 1) and prev[common] == parts[common]:
            common += 1
        for depth in range(common, len(parts) - 1):
            lines.append("  " * (depth + 1) + parts[depth] + "/")
        lines.append("  " * len(parts) + parts[-1])
        prev = parts[:-1]
    return "\n".join(lines)


def read_repo(scan: RepoScan, options: IngestOptions | None = None) -> Document:
    """Read the files of `scan` into a Document: tree Section first, then one Section per file."""
    options = options or IngestOptions()
    skipped, warnings = list(scan.skipped), list(scan.warnings)
    sections: list[Section] = []
    digest = hashlib.sha256()
    for f in scan.files:
        data = _read_entry(scan.root, f, options)
        if isinstance(data, Skip):
            skipped.append(data)
            continue
        if len(data) != f.size:
            warnings.append(f"{f.display}: size changed during the scan ({f.size:,} → {len(data):,} bytes); "
                            f"read as found")
        if looks_binary(data):
            skipped.append(Skip(f.display, "binary", "NUL bytes in the first 8 KiB"))
            continue
        try:
            text, w = decode_text(data, f.display, strict_binary=True)
        except BinaryData:
            skipped.append(Skip(f.display, "binary", "not text in any detected encoding"))
            continue
        if options.default_deny and len(text) >= MINIFIED_MIN_CHARS:
            avg = len(text) / (text.count("\n") + 1)
            if avg > options.minified_line_chars:
                skipped.append(Skip(f.display, "minified", f"average line length {avg:,.0f} characters"))
                continue
        warnings += w
        bidi = count_bidi(text)
        if bidi:
            warnings.append(f"{f.display}: {bidi} bidirectional control character(s) (possible Trojan Source)")
        digest.update(f.display.encode("utf-8", "surrogatepass") + b"\0" + hashlib.sha256(data).digest())
        # line_start=0: the marker is line 0, so the file's own lines keep their numbers in citations.
        sections.append(Section(f"{marker(f.display)}\n{text}", Origin(f.display, line_start=0)))
    if not sections:
        summary = ", ".join(f"{n} {r}" for r, n in skip_summary(skipped).items()) or "empty folder"
        raise SourceError(f"{scan.name}: no readable text files ({summary})")
    tree = tree_text(scan.name, [s.origin.path for s in sections])
    sections.insert(0, Section(tree, Origin(scan.name, title="directory tree")))
    return Document(scan.name, "repo", sections, digest.hexdigest(), skipped=skipped, warnings=warnings)


def file_texts(doc: Document) -> list[tuple[str, str]]:
    """(path, the file's own text) of each file Section of a repository Document, marker removed."""
    out = []
    for s in doc.sections:
        if s.origin.line_start == 0 and s.text.startswith(marker(s.origin.path)):
            out.append((s.origin.path, s.text[len(marker(s.origin.path)) + 1:]))
    return out


class RepoSource:
    name = "repo"
    suffixes = ()

    def matches(self, path: Path) -> bool:
        return path.is_dir()

    def read(self, path: Path, options: IngestOptions) -> Document:
        return read_repo(scan_repo(path, options), options)
