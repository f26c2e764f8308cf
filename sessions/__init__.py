"""Chat sessions: a SQLite store of named sessions and their turns. A leaf: no torch, no core."""
