"""Chat sessions: a SQLite store of named sessions, the memories they reference and their turns.

    store.SessionStore   the API (open, create, append_turn, search, export, ...)
    records              Session, Turn, MemoryRef, SearchHit with to_dict() (the --json shapes)
    migrations           the schema as numbered migrations
    errors               SessionError and its subclasses, each with an exit_code

A leaf: stdlib only, no torch, no core, no cli. Nothing is imported here, so that the CLI can import
`combllama.sessions.errors` at start-up for free.
"""
