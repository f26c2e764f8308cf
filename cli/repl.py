"""The chat REPL: reading messages (prompt_toolkit on a terminal, lines when piped), slash commands,
and one answer at a time streamed to stdout with its sources, stats and notices on stderr.

Input on a terminal: history across runs (Paths.state/chat_history; COMBLLAMA_NOHISTORY=1 keeps
none), Ctrl-R search, bracketed paste (a multi-line paste is one message), `\"\"\"` blocks, $EDITOR
with /edit or Ctrl-X Ctrl-E. Ctrl-C during an answer stops it (the partial answer is kept, marked
interrupted); on the prompt it clears the line or, when empty, says how to quit; Ctrl-D quits.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

from .render import error, note, safe, warn

SET_KEYS = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int}
DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 512, "seed": None}

HELP = """\
/help                 this list
/exit, /quit          leave (Ctrl-D works too); the session is saved as you go
/clear                forget this session's turns (memories and settings stay)
/add NAME|PATH        attach a memory (a path is ingested first, or reused)
/drop NAME            detach a memory (the memory itself is never changed)
/docs                 attached memories and their sizes
/tokens               how the model's window is spent: memory, instructions, history, free
/stats [on|off]       speed and token counts of the last answer; on/off: after every answer
/cite [on|off]        sources of the last answer; on/off: after every answer
/system [TEXT|off]    show, set or remove extra instructions for the model
/set [KEY VALUE]      show settings, or set temperature, top_p, max_tokens, seed
/retry                answer the last question again (the earlier answer stays in the transcript)
/save [NAME]          name (rename) this session; turns are saved as they happen
/sessions             list sessions
/edit                 write the next message in $EDITOR
\"\"\"                   start and end a multi-line message (a paste is one message too)"""

COMMANDS = ["/help", "/exit", "/quit", "/clear", "/add", "/drop", "/docs", "/tokens", "/stats", "/cite", "/system",
            "/set", "/retry", "/save", "/sessions", "/edit"]


# ------------------------------------------------------------------------------------------- input

class PipedInput:
    """Messages from a non-terminal stdin: one per line, `\"\"\"` blocks span lines."""

    interactive = False

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin

    def read(self, continuation: bool = False) -> str:
        line = self.stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")


class TerminalInput:
    """prompt_toolkit on a terminal (the prompt goes to stderr when stdout is piped)."""

    interactive = True

    def __init__(self, history_path):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.output import create_output

        kb = KeyBindings()

        @kb.add("c-c")
        def _(event):
            # Clear a typed line; on an empty one let the REPL say how to quit.
            if event.current_buffer.text:
                event.current_buffer.reset()
            else:
                event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

        history = InMemoryHistory()
        if history_path is not None:
            history_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            history = FileHistory(str(history_path))
        output = None if sys.stdout.isatty() else create_output(stdout=sys.stderr)
        self.session = PromptSession(history=history, enable_open_in_editor=True, key_bindings=kb, output=output,
                                     completer=WordCompleter(COMMANDS, sentence=True), complete_while_typing=False,
                                     enable_history_search=False)

    def read(self, continuation: bool = False) -> str:
        return self.session.prompt("... " if continuation else "> ")


def make_input(history_path):
    return TerminalInput(history_path) if sys.stdin.isatty() else PipedInput()


def read_message(reader) -> str:
    """One message: a line (or a pasted block), or a `\"\"\"` block over several lines."""
    first = reader.read()
    if not first.lstrip().startswith('"""'):
        return first
    body = first.lstrip()[3:]
    if body.rstrip().endswith('"""'):
        return body.rstrip()[:-3]
    lines = [body] if body else []
    while True:
        try:
            line = reader.read(continuation=True)
        except EOFError:
            break  # an unterminated block at the end of piped input is still a message
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            break
        lines.append(line)
    return "\n".join(lines).strip("\n")


def history_path():
    from ..core.paths import Paths

    if os.environ.get("COMBLLAMA_NOHISTORY") == "1":
        return None
    return Paths.from_env().state / "chat_history"


# ------------------------------------------------------------------------------------------- chat

@dataclass
class LastAnswer:
    question: str
    cited: list
    stats: dict
    usage: dict


class ChatApp:
    """One session's chat: memories attached from the session, turns saved to it as they end."""

    def __init__(self, loaded, store, session, *, render: str, show_stats: bool, cite: bool):
        self.loaded, self.store, self.session = loaded, store, session
        self.render, self.show_stats, self.cite_on = render, show_stats, cite
        self.attached_cache: dict[str, tuple] = {}  # memory name → (reader, KVMemory), reused across /add /drop
        self.conv = None
        self.last: LastAnswer | None = None
        self.folded = 0  # the oldest turns, held by the session's own memory instead of the prompt
        self.history_bytes = 0  # that memory's tensor bytes
        self._history = None  # core.history.SessionHistory, made by the first attach

    # ------------------------------------------------------------------ settings, memories, history

    def setting(self, key: str):
        return self.session.settings.get(key, DEFAULTS[key])

    def method_name(self) -> str:
        """The session's method (long chats fold turns with it): the one `chat --method` set, else the first
        attached memory's (so history joins the documents), else the model's default."""
        from ..core.errors import CombllamaError
        from ..core.memory.store import MemoryStore
        from ..core.methods import default_method
        from ..core.paths import Paths

        if self.session.settings.get("method"):
            return self.session.settings["method"]
        for name in self.session.memory_names:
            try:
                return MemoryStore(Paths.from_env().memories).open(name).manifest["method"]["name"]
            except CombllamaError:  # an unreadable memory is reported by attach
                continue
        return default_method(self.loaded).name

    def session_history(self, positions: int = 0):
        """The session's folded turns (core/history.py), made once; `positions`: what the documents take of
        the window (it sets how much history the prompt keeps verbatim)."""
        if self._history is None:
            from ..core.history import HistoryPolicy, SessionHistory, turn_counter
            from ..core.methods import get_method
            from ..core.paths import Paths

            policy = HistoryPolicy.for_window(self.loaded.window, positions, self.session.settings.get("history_budget"))
            self._history = SessionHistory(self.loaded, Paths.from_env().history(self.session.id),
                                           get_method(self.method_name()), policy, self.session.name,
                                           turn_counter(self.loaded.tokenizer))
        return self._history

    def records(self) -> list[tuple[int, str, str]]:
        """(seq, question, answer) of every turn, oldest first; an answer replaced by /retry is left out."""
        turns = self.store.turns(self.session)
        replaced = {t.usage.get("retry_of") for t in turns}
        return [(t.seq, t.question, t.answer) for t in turns if t.seq not in replaced]

    def fold(self) -> bool:
        """Fold the oldest turns into the session memory where the policy says so; True if it changed. A
        failure is reported and leaves the turns in the prompt (the oldest are dropped as they must)."""
        from ..core.errors import CombllamaError
        from .render import human_bytes

        history = self.session_history()
        try:
            result = history.sync(self.records())
        except CombllamaError as e:
            warn(f"could not fold earlier turns into the session memory: {e}")
            return False
        self.folded, self.history_bytes = result.folded, result.bytes
        method = history.method.name
        for e in result.events:
            if e.kind == "fold":
                note(f"folded turns {e.first}-{e.last} ({e.tokens:,} tokens) into the session memory ({method}, "
                     f"+{human_bytes(e.bytes)})")
            elif e.kind == "compact":
                note(f"compacted the session memory: turns {e.first}-{e.last} encoded again at {e.fraction:.0%} "
                     f"({human_bytes(e.bytes)}) to stay within {human_bytes(result.budget)}")
            else:
                warn(f"forgot turns {e.first}-{e.last}: the session memory is over its {human_bytes(result.budget)} "
                     f"budget and {method} cannot compress it further")
        return bool(result.events)

    def attach(self, fold: bool = True) -> None:
        """(Re)build the conversation from the session's memories, then its folded turns."""
        from ..core.chat import Conversation, combine
        from ..core.errors import CombllamaError, IncompatibleMemoryError
        from ..core.fast.load import attach_reader
        from ..core.memory.store import MemoryStore
        from ..core.paths import Paths

        memories = MemoryStore(Paths.from_env().memories)
        parts = []
        for ref in self.session.memories:
            try:
                if ref.name not in self.attached_cache:
                    reader = memories.open(ref.name)
                    kv = attach_reader(reader, self.loaded)
                    self.attached_cache[ref.name] = (reader, kv)
                reader, kv = self.attached_cache[ref.name]
            except CombllamaError as e:
                warn(f"memory {ref.name!r} left out: {e} (/drop {ref.name} to detach it)")
                continue
            if ref.key and reader.manifest.get("content_key") != ref.key:
                warn(f"memory {ref.name!r} was rebuilt since it was attached; using its current contents")
            parts.append((ref.name, reader.manifest, kv))
        for name in set(self.attached_cache) - set(self.session.memory_names):
            del self.attached_cache[name]
        self.session_history(sum(kv.logical_length for _, _, kv in parts))
        if fold:
            self.fold()
        history = self.session_history()
        try:
            try:
                parts += history.parts()
            except IncompatibleMemoryError:  # folded with another adapter (an upgrade): fold those turns again
                history.clear()
                self.fold()
                parts += history.parts()
        except CombllamaError as e:
            warn(f"the memory of this session's earlier turns is left out: {e}")
        attached = combine(self.loaded, parts)
        if attached.inactive:
            warn(f"{', '.join(attached.inactive)} left out: together with {', '.join(attached.names)} the memories "
                 f"exceed the model's {self.loaded.window:,}-token window; answers read only "
                 f"{', '.join(attached.names)} (/drop to choose)")
        if attached.apart:
            warn(f"{', '.join(attached.apart)} left out: memories of different methods cannot be read together; "
                 f"answers read only {', '.join(attached.names)}")
        self.conv = Conversation(self.loaded, attached)

    def history(self):
        """Turns the prompt carries, oldest first: those not folded into the session memory."""
        from ..core.prompt import Turn

        return [Turn(q, a) for _, q, a in self.records()[self.folded:]]

    def refresh(self) -> None:
        self.session = self.store.get(self.session.id)

    # ------------------------------------------------------------------------------------- answer

    def ask(self, question: str, retry_of: int | None = None) -> None:
        from ..core.engine import GenerateOptions
        from ..core.tokenize import StreamDecoder
        from .mdstream import open_stream

        options = GenerateOptions(self.setting("max_tokens"), self.setting("temperature"), self.setting("top_p"),
                                  self.setting("seed"))
        history = self.history()
        if retry_of is not None:
            history = history[:-1]
        prompt = self.conv.prompt(question, history, self.session.system or "", options.max_new_tokens)
        if prompt.dropped:
            warn(f"left out the {prompt.dropped} oldest turn(s) of this session to fit the model's window "
                 f"({prompt.history_tokens:,} tokens of history kept)")
        decoder = StreamDecoder(self.loaded.tokenizer)
        tokens: list[int] = []
        text = ""
        interrupted = False
        stream = open_stream(self.render)
        gen = self.conv.generate(prompt.ids, options)
        try:
            for token in gen:
                tokens.append(token)
                text += decoder.feed(token)
                stream.update(text)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            gen.close()  # the engine trims the cache back to the memory
            text += decoder.flush()
            stream.update(text, final=True)
        if interrupted:
            note("[interrupted]")
        cited = []
        if self.cite_on and tokens:
            try:
                cited = self.conv.cite(prompt.ids, tokens)
            except KeyboardInterrupt:
                note("citations skipped")
        st = self.conv.engine.stats.to_dict()
        usage = {"question_tokens": prompt.question_tokens, "memory_tokens": self.conv.attached.memory.logical_length,
                 "history_tokens": prompt.history_tokens, "output_tokens": len(tokens),
                 "dropped_turns": prompt.dropped, "folded_turns": self.folded, "history_bytes": self.history_bytes}
        if retry_of is not None:
            usage["retry_of"] = retry_of
        timings = {"load_ms": round(self.loaded.load_seconds * 1000), "prefill_ms": round(st["prefill_s"] * 1000),
                   "decode_ms": round(st["decode_s"] * 1000), "decode_tok_s": st["decode_tok_s"]}
        from .sources import print_sources, source_records

        self.store.append_turn(self.session, question, text, sources=source_records(cited), usage=usage,
                               timings=timings, interrupted=interrupted)
        self.refresh()
        if self.fold():
            self.attach(fold=False)
        self.last = LastAnswer(question, cited, st, usage)
        if self.cite_on:
            print_sources(cited)
        if self.show_stats:
            self.print_stats()

    def print_stats(self) -> None:
        if self.last is None:
            note("no answer yet")
            return
        st, u = self.last.stats, self.last.usage
        note(f"question {u['question_tokens']} tok · memory {u['memory_tokens']:,} tok · history "
             f"{u['history_tokens']:,} tok · prefill {st['prefill_s']:.2f} s "
             f"({st['prefill_tok_s'] or 0:,.0f} tok/s) · "
             f"decode {st['new_tokens']} tok in {st['decode_s']:.2f} s ({st['decode_tok_s'] or 0:.1f} tok/s) · "
             f"load {self.loaded.load_seconds:.2f} s · {self.loaded.device} "
             f"{str(self.loaded.dtype).removeprefix('torch.')}")

    # ----------------------------------------------------------------------------------- commands

    def command(self, line: str, reader) -> bool:
        """Run a slash command; False means leave the chat."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        handler = getattr(self, "cmd_" + name[1:], None) if name[1:].isidentifier() else None
        if handler is None:
            error(f"unknown command {name} (/help lists them)")
            return True
        if name in ("/exit", "/quit"):
            return False
        handler(arg, reader) if name == "/edit" else handler(arg)
        return True

    def cmd_help(self, arg):
        sys.stderr.write(HELP + "\n")

    def cmd_exit(self, arg):  # handled in command(); present so /help and dispatch agree
        pass

    cmd_quit = cmd_exit

    def cmd_clear(self, arg):
        n = self.store.clear(self.session)
        self.refresh()
        if self._history is not None:
            self._history.clear()
        self.folded = 0
        self.attach(fold=False)
        note(f"forgot {n} turn(s); memories and settings stay")

    def cmd_add(self, arg):
        from .ask_cmd import resolve_memory

        if not arg:
            error("usage: /add NAME|PATH")
            return
        reader, _ = resolve_memory(self.loaded, arg, self.session.settings.get("method"), None, quiet=False)
        reader.check_model(self.loaded.fingerprint)
        self.session = self.store.add_memory(self.session, reader.name, reader.manifest.get("content_key"))
        self.attached_cache.pop(reader.name, None)
        self.attach()
        note(f"attached {reader.name!r} ({reader.manifest['positions']['logical_length']:,} tokens)")

    def cmd_drop(self, arg):
        if not arg:
            error("usage: /drop NAME")
            return
        self.session = self.store.drop_memory(self.session, arg)
        self.attach()
        note(f"detached {arg!r}")

    def cmd_docs(self, arg):
        a = self.conv.attached
        if not self.session.memories:
            note("no memory attached (/add NAME|PATH)")
        for ref in self.session.memories:
            state = f"{a.tokens[ref.name]:,} tokens" if ref.name in a.tokens else "not active"
            note(f"{ref.name}  {state}")

    def cmd_tokens(self, arg):
        from ..core.prompt import turn_ids

        tok = self.loaded.tokenizer
        history = self.history()
        base = len(turn_ids(tok, "", []))
        instr = len(turn_ids(tok, "", [], instructions=self.session.system or "")) - base
        hist = len(turn_ids(tok, "", history)) - base
        mem = self.conv.attached.memory.logical_length
        window = self.loaded.window
        rows = [(n, t) for n, t in self.conv.attached.tokens.items()] or [("(prompt only)", mem)]
        for n, t in rows:
            note(f"{t:>10,}  memory {n}")
        note(f"{instr:>10,}  instructions (/system)")
        note(f"{hist:>10,}  history ({len(history)} turns)")
        if self.folded:
            from .render import human_bytes

            h = self._history
            note(f"{'':>10}  earlier turns: {self.folded} folded into the session memory "
                 f"({h.method.name}, {human_bytes(h.bytes())} of {human_bytes(h.budget)})")
        note(f"{base:>10,}  turn framing")
        note(f"{window - mem - instr - hist - base:>10,}  free of {window:,} (answers take up to "
             f"{self.setting('max_tokens'):,})")

    def _toggle(self, arg, attr, show):
        if arg in ("on", "off"):
            setattr(self, attr, arg == "on")
            note(f"{'/' + attr.split('_')[-1]} {arg}")
        elif arg:
            error("use on or off")
        else:
            show()

    def cmd_stats(self, arg):
        self._toggle(arg, "show_stats", self.print_stats)

    def cmd_cite(self, arg):
        from .sources import sources_line

        def show():
            if self.last is None:
                note("no answer yet")
            else:
                note(sources_line(self.last.cited) or "no sources" + ("" if self.cite_on else " (/cite on)"))

        self._toggle(arg, "cite_on", show)
        if arg in ("on", "off"):
            self.session = self.store.update_settings(self.session, {"cite": self.cite_on})

    def cmd_system(self, arg):
        if not arg:
            note(f"instructions: {self.session.system}" if self.session.system else "no extra instructions")
            return
        self.session = self.store.update_settings(self.session, system=None if arg == "off" else arg)
        note("instructions removed" if arg == "off" else "instructions set")

    def cmd_set(self, arg):
        if not arg:
            note("  ".join(f"{k}={self.setting(k)}" for k in SET_KEYS))
            return
        try:
            key, value = shlex.split(arg)
            if key not in SET_KEYS:
                raise ValueError(f"unknown setting {key!r} (choose from {', '.join(SET_KEYS)})")
            parsed = SET_KEYS[key](value)
            from ..core.engine import GenerateOptions

            check = {**{k: self.setting(k) for k in SET_KEYS}, key: parsed}
            GenerateOptions(check["max_tokens"], check["temperature"], check["top_p"], check["seed"])
        except ValueError as e:
            error(f"/set: {e}" if str(e) else "usage: /set KEY VALUE")
            return
        self.session = self.store.update_settings(self.session, {key: parsed})
        note(f"{key} = {parsed}")

    def cmd_retry(self, arg):
        turns = self.store.turns(self.session, limit=1)
        if not turns:
            note("nothing to retry yet")
            return
        self.ask(turns[-1].question, retry_of=turns[-1].seq)

    def cmd_save(self, arg):
        if arg:
            self.session = self.store.rename(self.session, arg)
        note(f"session {self.session.name!r} ({self.session.turn_count} turns; saved as they happen)")

    def cmd_sessions(self, arg):
        for s in self.store.list(limit=20):
            mark = "*" if s.id == self.session.id else " "
            note(f"{mark} {s.name}  {s.turn_count} turns  {', '.join(s.memory_names) or '-'}  {s.updated_at[:16]}")

    def cmd_edit(self, arg, reader=None):
        import click

        text = click.edit(arg or "")
        if text and text.strip():
            self.ask(text.strip())
        else:
            note("nothing to send")

    # -------------------------------------------------------------------------------------- loop

    def run(self, reader) -> None:
        from .main import _is_typed

        if reader.interactive:
            turns = self.session.turn_count
            note(f"session {self.session.name!r}" + (f" ({turns} earlier turns)" if turns else "")
                 + (f" · {', '.join(self.conv.attached.names)}" if self.conv.attached.names else " · no memory")
                 + " · /help for commands, Ctrl-D to quit")
        while True:
            try:
                message = read_message(reader)
            except KeyboardInterrupt:
                note("(Ctrl-D or /exit to quit)")
                continue
            except EOFError:
                if reader.interactive:
                    sys.stderr.write("\n")
                return
            if not message.strip():
                continue
            try:
                if message.startswith("/") and not message.startswith("//"):
                    if not self.command(message, reader):
                        return
                else:
                    # "//text" sends a message that begins with "/".
                    self.ask(message[1:] if message.startswith("//") else message)
            except Exception as e:  # a typed error (bad memory, busy database) ends a command, not the chat
                if not _is_typed(e):
                    raise
                error(str(e))
            except KeyboardInterrupt:
                note("[interrupted]")
