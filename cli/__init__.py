"""The `combllama` command line: thin click commands over core, ingest and sessions."""
