"""Repository source: ignore rules in git and walk mode, deny list, links, special files, awkward
content, caps, and citations that land on the file's own lines (reliability.md §2 items 25-28)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest

from combllama.ingest import IngestOptions, SourceError, file_texts, label, load, scan, skip_summary
from combllama.ingest.repo import read_repo, scan_repo

HAS_GIT = shutil.which("git") is not None


def write(root, rel, data="x\n"):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def ignore_tree(root):
    write(root, ".gitignore", "*.log\nsecret/\n/top-only.txt\n")
    write(root, "app.py", "print('app')\n")
    write(root, "debug.log", "noise\n")
    write(root, "top-only.txt", "hidden\n")
    write(root, "pkg/top-only.txt", "shown: pattern anchored at root\n")
    write(root, "pkg/.gitignore", "!keep.log\n*.tmp\n")
    write(root, "pkg/keep.log", "kept by negation\n")
    write(root, "pkg/other.log", "ignored\n")
    write(root, "pkg/x.tmp", "ignored nested\n")
    write(root, "pkg/deep/.gitignore", "!x.tmp\n")
    write(root, "pkg/deep/x.tmp", "re-included deeper\n")
    write(root, "secret/.gitignore", "!inside.txt\n")
    write(root, "secret/inside.txt", "cannot be re-included: parent dir excluded\n")
    write(root, ".combllamaignore", "docs/\n")
    write(root, "docs/guide.md", "# Guide\n")
    return root


EXPECTED = [".combllamaignore", ".gitignore", "app.py", "pkg/.gitignore", "pkg/deep/.gitignore", "pkg/deep/x.tmp",
            "pkg/keep.log", "pkg/top-only.txt"]


def git_init(root):
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q", str(root)], check=True, env=env)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True, env=env)


def test_walk_mode_nested_gitignore_and_negation(tmp_path):
    s = scan(ignore_tree(tmp_path / "r"))
    assert s.mode == "walk"
    assert [f.rel for f in s.files] == EXPECTED
    ignored = {k.path: k.detail for k in s.skipped if k.reason == "ignored"}
    assert ignored == {"debug.log": ".gitignore", "top-only.txt": ".gitignore", "secret/": ".gitignore",
                       "pkg/other.log": ".gitignore", "pkg/x.tmp": "pkg/.gitignore", "docs/": ".combllamaignore"}


@pytest.mark.skipif(not HAS_GIT, reason="git not installed")
def test_git_mode_agrees_with_walk_mode(tmp_path):
    root = ignore_tree(tmp_path / "r")
    git_init(root)
    write(root, "untracked.py", "u = 1\n")
    write(root, "tracked_then_deleted.py", "gone\n")
    subprocess.run(["git", "-C", str(root), "add", "tracked_then_deleted.py"], check=True)
    (root / "tracked_then_deleted.py").unlink()
    s = scan(root)
    assert s.mode == "git"
    assert [f.rel for f in s.files] == sorted(EXPECTED + ["untracked.py"])
    reasons = {k.path: k.reason for k in s.skipped}
    assert reasons["tracked_then_deleted.py"] == "missing"
    assert reasons["docs/"] == "ignored" and reasons["debug.log"] == "ignored" and reasons["secret/"] == "ignored"
    walk = scan(root, IngestOptions(use_git=False))
    assert [f.rel for f in walk.files] == [f.rel for f in s.files]


def test_default_deny_list(tmp_path):
    root = tmp_path / "r"
    write(root, "main.js", "console.log(1)\n")
    for rel in ["node_modules/a/index.js", ".venv/lib/x.py", "__pycache__/m.pyc", "dist/out.js", "build/b.txt",
                "target/t.rs", "pkg.egg-info/PKG-INFO", "package-lock.json", "poetry.lock", "lib/jq.min.js",
                "styles.min.css"]:
        write(root, rel)
    write(root, "bundle.js", ("var a=1;" * 400 + "\n") * 3)  # long lines, but not named .min.js
    doc = load(root)
    assert [p for p, _ in file_texts(doc)] == ["main.js"]
    s = skip_summary(doc.skipped)
    assert s == {"denied": 11, "minified": 1}
    assert any(k.path == "bundle.js" and k.reason == "minified" for k in doc.skipped)
    everything = load(root, IngestOptions(default_deny=False))
    assert len(file_texts(everything)) == 13  # the .pyc is still binary by extension


def test_symlinks_are_not_followed_by_default(tmp_path):
    outside = write(tmp_path, "outside/secret.txt", "TOP SECRET\n")
    root = tmp_path / "r"
    write(root, "real.txt", "real\n")
    (root / "to_outside").symlink_to(outside)
    (root / "to_etc").symlink_to("/etc/passwd")
    (root / "to_parent").symlink_to("..")
    (root / "loop").symlink_to(".")
    (root / "inside_link.txt").symlink_to("real.txt")
    doc = load(root)
    assert "TOP SECRET" not in doc.joined() and "root:x:0:0" not in doc.joined()
    links = {k.path: k.detail for k in doc.skipped if k.reason == "symlink"}
    assert set(links) == {"to_outside", "to_etc", "to_parent", "loop", "inside_link.txt"}
    assert [p for p, _ in file_texts(doc)] == ["real.txt"]


def test_follow_symlinks_stays_inside_the_root(tmp_path):
    outside = write(tmp_path, "outside/secret.txt", "TOP SECRET\n")
    root = tmp_path / "r"
    write(root, "real.txt", "real\n")
    write(root, "sub/b.txt", "b\n")
    (root / "to_outside").symlink_to(outside)
    (root / "sub/link_b.txt").symlink_to("b.txt")
    (root / "alias.txt").symlink_to("sub/b.txt")
    (root / "loop").symlink_to(".")
    doc = load(root, IngestOptions(follow_symlinks=True))
    assert "TOP SECRET" not in doc.joined()
    assert [p for p, _ in file_texts(doc)] == ["alias.txt", "real.txt"]
    reasons = {k.path: (k.reason, k.detail) for k in doc.skipped}
    assert "outside the root" in reasons["to_outside"][1]
    assert reasons["sub/b.txt"][0] == "duplicate" and reasons["sub/link_b.txt"][0] == "duplicate"
    assert "directory" in reasons["loop"][1]


@pytest.mark.timeout(20)
def test_fifo_socket_and_device_are_never_opened(tmp_path):
    root = tmp_path / "r"
    write(root, "ok.txt", "fine\n")
    os.mkfifo(root / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    short = tmp_path / "s"  # AF_UNIX paths are limited to ~100 bytes
    sock.bind(str(short))
    os.rename(short, root / "sock")
    (root / "zero").symlink_to("/dev/zero")
    try:
        doc = load(root)
        kinds = {k.path: (k.reason, k.detail) for k in doc.skipped}
        assert kinds["pipe"][0] == "special-file" and "FIFO" in kinds["pipe"][1]
        assert kinds["sock"][0] == "special-file" and "socket" in kinds["sock"][1]
        assert kinds["zero"][0] == "symlink"
        doc = load(root, IngestOptions(follow_symlinks=True))
        assert {k.path: k.reason for k in doc.skipped}["zero"] == "symlink"
    finally:
        sock.close()


@pytest.mark.timeout(20)
def test_fifo_named_directly_is_refused(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SourceError, match="not a regular file"):
        load(tmp_path / "pipe")


def test_awkward_content(tmp_path):
    root = tmp_path / "r"
    write(root, "elf", b"\x7fELF\x02\x01\x01\x00" + bytes(200))
    write(root, "image.bin2", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(root, "utf16.txt", "héllo wörld\n".encode("utf-16"))
    write(root, "utf16le-nobom.txt", "plain ascii in utf16\nline two\n".encode("utf-16-le"))
    write(root, "latin.py", b"# caf\xe9\nx = 1\n" + b"y = 2\n" * 50)
    write(root, "crlf.txt", b"a\r\nb\r\n")
    write(root, "bidi.py", "access = 'user\u202e \u2066// admin\u2069'\n")
    doc = load(root)
    texts = dict(file_texts(doc))
    assert texts["utf16.txt"] == "héllo wörld\n"
    assert texts["utf16le-nobom.txt"] == "plain ascii in utf16\nline two\n"
    assert texts["latin.py"].startswith("# caf\ufffd\nx = 1")
    assert texts["crlf.txt"] == "a\nb\n"
    assert {k.path: k.reason for k in doc.skipped} == {"elf": "binary", "image.bin2": "binary"}
    assert any("latin.py: 1 invalid UTF-8 byte sequence(s) replaced" in w for w in doc.warnings)
    assert any("bidi.py: 3 bidirectional" in w for w in doc.warnings)


@pytest.mark.timeout(30)
def test_fifty_megabyte_one_line_file(tmp_path):
    root = tmp_path / "r"
    write(root, "small.js", "ok()\n")
    with open(root / "huge.min.js.txt", "wb") as f:
        f.write(b"a" * (50 * 1024 * 1024))
    doc = load(root)
    skip = {k.path: k for k in doc.skipped}["huge.min.js.txt"]
    assert skip.reason == "too-large" and "52,428,800 bytes" in skip.detail
    doc = load(root, IngestOptions(max_file_bytes=64 * 1024 * 1024))
    assert {k.path: k.reason for k in doc.skipped}["huge.min.js.txt"] == "minified"


def test_sparse_file_is_not_read(tmp_path):
    root = tmp_path / "r"
    write(root, "a.txt", "a\n")
    with open(root / "sparse.txt", "wb") as f:
        f.truncate(5 * 1024 ** 3)
    s = scan(root)
    assert {k.path: k.reason for k in s.skipped} == {"sparse.txt": "too-large"}


def test_count_and_total_caps_are_reported(tmp_path):
    root = tmp_path / "r"
    for i in range(5):
        write(root, f"f{i}.txt", "12345\n")
    s = scan(root, IngestOptions(max_files=3))
    assert [f.rel for f in s.files] == ["f0.txt", "f1.txt", "f2.txt"]
    assert skip_summary(s.skipped) == {"over-limit": 2} and "2 file(s) left out" in s.warnings[0]
    s = scan(root, IngestOptions(max_total_bytes=13))
    assert len(s.files) == 2 and skip_summary(s.skipped) == {"over-limit": 3}


def test_citation_lines_are_the_files_own_lines(tmp_path):
    root = tmp_path / "r"
    write(root, "src/app.py", "".join(f"line {i}\n" for i in range(1, 61)))
    write(root, "README.md", "# Title\ntext\n")
    doc = load(root)
    assert doc.sections[0].origin.title == "directory tree"
    assert "src/\n" in doc.sections[0].text and "app.py" in doc.sections[0].text
    assert [s.text.split("\n", 1)[0] for s in doc.sections[1:]] == ["==> README.md <==", "==> src/app.py <=="]
    j = doc.joined()
    a = j.index("line 10\n")
    b = j.index("line 40\n") + len("line 40")
    assert label(doc.span(a, b)) == "src/app.py:10-40"
    marker = j.index("==> src/app.py")
    assert label(doc.span(marker, j.index("line 2\n") + 3)) == "src/app.py:1-2"
    # Across two files: both named, each with its own lines.
    assert label(doc.span(j.index("text\n"), j.index("line 3\n") + 3)) == "README.md:2, src/app.py:1-3"


def test_file_changed_between_scan_and_read(tmp_path):
    root = tmp_path / "r"
    write(root, "a.txt", "first\n")
    write(root, "b.txt", "bee\n")
    s = scan_repo(root)
    write(root, "new.tmp", "replaced\n")
    os.replace(root / "new.tmp", root / "a.txt")  # a new inode under the old name
    doc = read_repo(s)
    assert {k.path: k.reason for k in doc.skipped} == {"a.txt": "changed"}
    assert "replaced" not in doc.joined()


def test_odd_file_names_are_escaped(tmp_path):
    root = tmp_path / "r"
    write(root, "new\nline.txt", "n\n")
    (root / os.fsdecode(b"bad\xffname.txt")).write_text("b\n")
    write(root, "esc\x1b[2J.txt", "e\n")
    paths = [p for p, _ in file_texts(load(root))]
    assert paths == ["bad\\xffname.txt", "esc\\x1b[2J.txt", "new\\nline.txt"]


def test_empty_or_all_skipped_folder_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no readable text files"):
        load(tmp_path / "empty")
    write(tmp_path / "bin", "x.dat", b"\0\1\2")
    with pytest.raises(SourceError, match=r"no readable text files \(1 binary\)"):
        load(tmp_path / "bin")


def test_stable_order_and_content_hash(tmp_path):
    root = tmp_path / "r"
    for name in ["b.py", "a.py", "c/d.py"]:
        write(root, name, f"# {name}\n")
    one, two = load(root), load(root)
    assert [s.origin.path for s in one.sections[1:]] == ["a.py", "b.py", "c/d.py"]
    assert one.sha256 == two.sha256
    write(root, "a.py", "# changed\n")
    assert load(root).sha256 != one.sha256


def test_hard_links_are_read_and_reported(tmp_path):
    """Case 25: a hard link can't be told from a plain file, and its content may come from outside the tree:
    it is read, and named in the warning "hard-linked file(s) included"; two names of one inode inside the
    tree are read once (the second is a `duplicate` skip)."""
    outside = write(tmp_path, "outside/secret.txt", "OUTSIDE CONTENT\n")
    root = tmp_path / "r"
    write(root, "plain.txt", "plain\n")
    os.link(outside, root / "linked.txt")
    write(root, "a/first.txt", "twice linked\n")
    os.link(root / "a" / "first.txt", root / "b.txt")
    doc = load(root, IngestOptions(use_git=False))
    assert [p for p, _ in file_texts(doc)] == ["b.txt", "linked.txt", "plain.txt"]  # a folder's files first
    assert "OUTSIDE CONTENT" in doc.joined()
    assert {k.path: k.reason for k in doc.skipped} == {"a/first.txt": "duplicate"}
    warning = next(w for w in doc.warnings if "hard-linked" in w)
    assert warning == ("r/: 2 hard-linked file(s) included; their content may come from outside the folder: "
                       "b.txt, linked.txt")


def _changing_tree(tmp_path):
    root = tmp_path / "r"
    write(root, "keep.txt", "kept\n")
    write(root, "gone.txt", "deleted after the scan\n")
    write(root, "shrinks.txt", "".join(f"line {i}\n" for i in range(50)))
    write(root, "grows.txt", "first line\n")
    return root


def test_files_deleted_truncated_or_grown_between_scan_and_read(tmp_path):
    """Case 28: between the scan (lstat) and the read, one file is deleted (skipped `changed`: "cannot open
    any more"), one truncated in place and one appended to (each read as found, with a warning giving the
    scanned and the read size). What is recorded is what was read: the text, and the document hash, equal a
    fresh scan and read of the changed tree."""
    root = _changing_tree(tmp_path)
    s = scan_repo(root, IngestOptions(use_git=False))
    before = read_repo(scan_repo(root, IngestOptions(use_git=False)))
    (root / "gone.txt").unlink()
    with open(root / "shrinks.txt", "r+b") as f:
        f.truncate(14)  # "line 0\nline 1\n"
    with open(root / "grows.txt", "ab") as f:
        f.write(b"second line, appended after the scan\n")
    doc = read_repo(s, IngestOptions(use_git=False))
    assert [(k.path, k.reason) for k in doc.skipped] == [("gone.txt", "changed")]
    assert doc.skipped[0].detail.startswith("cannot open any more")
    assert "shrinks.txt: size changed during the scan (390 → 14 bytes); read as found" in doc.warnings
    assert "grows.txt: size changed during the scan (11 → 48 bytes); read as found" in doc.warnings
    texts = dict(file_texts(doc))
    assert texts["shrinks.txt"] == "line 0\nline 1\n" and texts["grows.txt"].endswith("appended after the scan\n")
    fresh = read_repo(scan_repo(root, IngestOptions(use_git=False)))
    assert doc.sha256 == fresh.sha256 != before.sha256
    assert dict(file_texts(fresh)) == texts


def test_file_growing_past_the_cap_between_scan_and_read(tmp_path):
    root = _changing_tree(tmp_path)
    options = IngestOptions(use_git=False, max_file_bytes=1000)
    s = scan_repo(root, options)
    with open(root / "grows.txt", "ab") as f:
        f.write(b"x" * 5000)
    doc = read_repo(s, options)
    assert {k.path: (k.reason, k.detail) for k in doc.skipped} == {
        "grows.txt": ("too-large", "grew past 1,000 bytes while being read")}
    assert "xxxx" not in doc.joined() and "kept" in doc.joined()
