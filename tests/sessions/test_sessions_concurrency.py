"""Two processes appending to one session at once (research/reliability.md item 17): no turn lost,
none duplicated, seq contiguous, each writer's turns in its own order."""
from __future__ import annotations

import subprocess
import sys
import time

from combllama.sessions.store import SessionStore

N = 50

WRITER = r"""
import os, random, sys, time
from combllama.sessions.store import SessionStore

path, tag, ready, go = sys.argv[1:5]
store = SessionStore(path, timeout=30)
open(ready, "w").close()
deadline = time.monotonic() + 30
while not os.path.exists(go):  # start together, so the appends really race
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.001)
for i in range(int(sys.argv[5])):
    store.append_turn("shared", f"{tag}-{i}", f"answer from {tag} number {i} " + tag * 200,
                      sources=[{"doc": tag, "lines": [i, i + 1]}], usage={"i": i}, timings={"tag": tag})
    # A pause between turns, as in a chat; without it SQLite's sleeping busy handler lets one writer
    # win every round and the appends hardly interleave.
    time.sleep(random.random() * 0.003)
store.close()
"""


def test_two_processes_append_to_one_session(tmp_path):
    path = tmp_path / "data" / "sessions.db"
    with SessionStore(path) as s:
        s.create("shared", memories=["book"])
    go = tmp_path / "go"
    procs, readies = [], []
    for tag in ("A", "B"):
        ready = tmp_path / f"ready-{tag}"
        readies.append(ready)
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(ready), str(go), str(N)],
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 30
    while not all(r.exists() for r in readies) and time.monotonic() < deadline:
        time.sleep(0.005)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err

    with SessionStore(path) as s:
        turns = s.turns("shared")
        assert [t.seq for t in turns] == list(range(1, 2 * N + 1))
        assert len({t.id for t in turns}) == 2 * N
        order = [t.question[0] for t in turns]
        assert sum(a != b for a, b in zip(order, order[1:])) >= 2, "the writers never overlapped: no race was tested"
        for tag in ("A", "B"):
            own = [t for t in turns if t.question.startswith(f"{tag}-")]
            assert [t.question for t in own] == [f"{tag}-{i}" for i in range(N)]  # in its own order
            for i, t in enumerate(own):  # intact: every field is the one that writer sent
                assert t.answer == f"answer from {tag} number {i} " + tag * 200
                assert t.sources == [{"doc": tag, "lines": [i, i + 1]}] and t.usage == {"i": i}
                assert t.timings == {"tag": tag}
        assert s.get("shared").turn_count == 2 * N and s.get("shared").memory_names == ["book"]
        assert len(s.search("A-7")) >= 1
        s.db.execute("INSERT INTO turns_fts (turns_fts, rank) VALUES ('integrity-check', 1)")
        assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_two_processes_creating_unnamed_sessions_get_distinct_names(tmp_path):
    """Placeholder and first-question names are chosen under the write lock, so racing creators never
    collide on the unique name."""
    path = tmp_path / "sessions.db"
    SessionStore(path).close()
    code = ("import sys\nfrom combllama.sessions.store import SessionStore\n"
            "s = SessionStore(sys.argv[1], timeout=30)\n"
            "for i in range(15):\n    x = s.create()\n    s.append_turn(x, 'same question', 'a')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    with SessionStore(path) as s:
        names = [x.name for x in s.list()]
    assert len(names) == 30 and len(set(n.lower() for n in names)) == 30
    assert set(names) == {"same-question"} | {f"same-question-{i}" for i in range(2, 31)}


def test_processes_opening_a_fresh_database_together_migrate_it_once(tmp_path):
    path = tmp_path / "fresh" / "sessions.db"
    go = tmp_path / "go"
    code = ("import os, sys, time\nfrom combllama.sessions.store import SessionStore\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
            "s = SessionStore(sys.argv[1], timeout=30)\ns.create()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(go)], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(0.3)  # let the interpreters start, so the opens race
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    import sqlite3
    from contextlib import closing

    from combllama.sessions import migrations
    with closing(sqlite3.connect(path)) as db:
        names = [r[0] for r in db.execute("SELECT name FROM _combllama_migrations")]
    assert names == [name for name, _ in migrations.MIGRATIONS]
    with SessionStore(path) as s:
        assert len(s.list()) == 4
