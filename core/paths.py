"""Where combllama keeps its state: per-user platform directories, one override for all.

COMBLLAMA_HOME puts everything under one directory; COMBLLAMA_MEMORY_DIR moves only the (large)
memories and COMBLLAMA_CACHE_DIR only the cache (converted model weights). Nothing is ever written next to the ingested documents or into the current directory.
No torch here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

APP = "combllama"


@dataclass(frozen=True)
class Paths:
    config: Path  # config.toml lives here
    data: Path  # sessions database
    memories: Path  # one bundle directory per memory
    cache: Path  # converted model weights, fingerprints: safe to delete
    state: Path  # input history, logs

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Paths":
        env = os.environ if environ is None else environ
        home = env.get("COMBLLAMA_HOME")
        if home:
            root = Path(home).expanduser()
            paths = cls(root / "config", root / "data", root / "memories", root / "cache", root / "state")
        else:
            import platformdirs

            data = Path(platformdirs.user_data_dir(APP))
            paths = cls(
                Path(platformdirs.user_config_dir(APP)),
                data,
                data / "memories",
                Path(platformdirs.user_cache_dir(APP)),
                Path(platformdirs.user_state_dir(APP)),
            )
        if env.get("COMBLLAMA_MEMORY_DIR"):
            paths = replace(paths, memories=Path(env["COMBLLAMA_MEMORY_DIR"]).expanduser())
        if env.get("COMBLLAMA_CACHE_DIR"):
            paths = replace(paths, cache=Path(env["COMBLLAMA_CACHE_DIR"]).expanduser())
        return paths

    def history(self, session_id: str) -> Path:
        """Where a session keeps the memory of its folded turns (core/history.py)."""
        return self.data / "history" / session_id

    def ensure(self, *dirs: Path) -> None:
        """Create the given directories (private to the user)."""
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
