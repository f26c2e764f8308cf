"""The long-chat run (issue 8): a scripted chat of N turns (200 by default) through the real `combllama chat`
loop, whose turn 3 states a fact that the last turn asks for.

The chat runs as a user runs it (a `combllama chat --session` process fed by a pipe, resumed between stages),
with the session's method (the model's default, CombLlama for SmolLM2) and its history budget. Before the
turns 25, 50, 100, 150 and N it is probed off the record, the same question asked three ways:
  memory  — what the chat reads now: the session memory of the folded turns plus the recent turns;
  full    — every earlier turn verbatim in the window, where they still fit ("full history");
  recent  — the recent turns alone (what dropping the oldest turns gives).
Each probe scores a greedy answer (does it contain the fact?) and ranks the fact against 9 distractors by the
teacher-forced log-probability of "Your locker code is XXXX." The turn-by-turn usage the chat saved shows the
session memory's bytes against its budget after every turn.

    python -m combllama.evals.long_chat --out evals/results/long-chat [--turns 200] [--budget-fraction 0.125]
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import save

FACT = "Please remember this: my locker code is 4817."
QUESTION = "What is my locker code?"
CODE = "4817"
CHECKPOINTS = (25, 50, 100, 150)

_FILLERS = [
    "Name a fruit that is {c}.", "Give me one word that rhymes with {w}.", "What is {a} plus {b}?",
    "Write one short sentence about {t}.", "Suggest a name for a {c} cat.", "Is {a} an even number?",
    "Give me a synonym for {w}.", "What colour is a ripe {f}?", "Tell me one fact about {t}.",
    "Spell the word {w} backwards.",
]
_WORDS = ["light", "stone", "river", "cloud", "paper", "garden", "window", "silver", "candle", "market"]
_TOPICS = ["the sea", "owls", "bicycles", "tea", "volcanoes", "libraries", "bees", "winter", "trains", "maps"]
_COLOURS = ["red", "green", "yellow", "orange", "purple"]
_FRUITS = ["banana", "lemon", "cherry", "plum", "apple"]


def script(turns: int, seed: int = 0) -> list[str]:
    """The user's messages: turn 3 states the fact, the last asks for it, the rest are small talk."""
    rng = random.Random(seed)
    out = ["Hi! I will ask you many small things today.", "Thanks. Keep your answers short, please.", FACT]
    while len(out) < turns - 1:
        out.append(rng.choice(_FILLERS).format(c=rng.choice(_COLOURS), w=rng.choice(_WORDS), a=rng.randint(2, 99),
                                               b=rng.randint(2, 99), t=rng.choice(_TOPICS), f=rng.choice(_FRUITS)))
    return out[:turns - 1] + [QUESTION]


def distractors(seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    codes = {CODE}
    while len(codes) < 10:
        codes.add(f"{rng.randint(1000, 9999)}")
    return sorted(codes)


def chat(messages: list[str], session: str, env: dict, max_tokens: int, model: str | None, device: str) -> float:
    """Send `messages` to `combllama chat --session` (resumed if it exists); seconds taken."""
    cmd = [sys.executable, "-c", "import sys; from combllama.cli.main import main; main(sys.argv[1:])", "chat",
           "--session", session, "--max-tokens", str(max_tokens), "--no-cite", "--render", "raw", "--device", device]
    if model:
        cmd += ["--model", model]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, input="".join(m.replace("\n", " ") + "\n" for m in messages), text=True, env=env,
                       capture_output=True)
    if r.returncode:
        raise SystemExit(f"chat failed ({r.returncode}):\n{r.stderr[-3000:]}")
    sys.stderr.write("".join(line + "\n" for line in r.stderr.splitlines() if "session memory" in line))
    return time.perf_counter() - t0


def score(loaded, conversation, question: str, history, codes: list[str], max_tokens: int) -> dict:
    """Greedy answer and the rank of CODE among `codes` by teacher-forced log-probability."""
    import torch

    from combllama.core.engine import GenerateOptions
    from combllama.core.methods.base import prefill, trim_cache

    try:
        prompt = conversation.prompt(question, history, max_new_tokens=max_tokens)
    except Exception as e:  # noqa: BLE001 - a question that does not fit is a result, not a crash
        return {"fits": False, "error": str(e)}
    if prompt.dropped:
        return {"fits": False, "dropped": prompt.dropped}
    ids = list(conversation.generate(prompt.ids, GenerateOptions(max_new_tokens=max_tokens)))
    text = loaded.tokenizer.decode(ids, skip_special_tokens=True)
    memory = conversation.attached.memory
    logp = {}
    for code in codes:
        cont = loaded.tokenizer.encode(f"Your locker code is {code}.", add_special_tokens=False)
        logits = prefill(loaded.model, prompt.ids + cont, memory.cache, memory.logical_length, memory.lengths[0],
                         all_logits=True)
        trim_cache(memory.cache, memory.lengths)
        lp = torch.log_softmax(logits[len(prompt.ids) - 1:-1].float(), -1)
        logp[code] = float(lp.gather(1, torch.tensor(cont, device=lp.device)[:, None]).sum())
    ranked = sorted(codes, key=lambda c: -logp[c])
    return {"fits": True, "answer": text, "correct": CODE in text, "rank": ranked.index(CODE) + 1,
            "margin": round(logp[CODE] - max(v for c, v in logp.items() if c != CODE), 3),
            "history_tokens": prompt.history_tokens, "prompt_tokens": len(prompt.ids)}


def probe(loaded, home: Path, session_name: str, codes: list[str], max_tokens: int) -> dict:
    """The three ways to ask QUESTION of the session as it stands."""
    from combllama.core.chat import Attached, Conversation, bare_memory, combine
    from combllama.core.history import HistoryPolicy, SessionHistory, turn_counter
    from combllama.core.methods import get_method
    from combllama.core.paths import Paths
    from combllama.core.prompt import Turn
    from combllama.sessions.store import SessionStore

    os.environ["COMBLLAMA_HOME"] = str(home)
    paths = Paths.from_env()
    store = SessionStore(paths.data / "sessions.db")
    session = store.get(session_name)
    records = [(t.seq, t.question, t.answer) for t in store.turns(session)]
    usage = store.turns(session)[-1].usage
    method = get_method(session.settings.get("method") or "full")
    policy = HistoryPolicy.for_window(loaded.window, 0, session.settings.get("history_budget"))
    history = SessionHistory(loaded, paths.history(session.id), method, policy, session.name,
                             turn_counter(loaded.tokenizer))
    folded = usage.get("folded_turns", 0)
    recent = [Turn(q, a) for _, q, a in records[folded:]]
    everything = [Turn(q, a) for _, q, a in records]
    out = {"turn": len(records) + 1, "folded": folded, "memory_bytes": history.bytes(), "budget": history.budget,
           "segments": [s.name for s in history.segments()]}
    out["memory"] = score(loaded, Conversation(loaded, combine(loaded, history.parts())), QUESTION, recent, codes,
                          max_tokens)
    bare = Conversation(loaded, Attached(bare_memory(loaded), []))
    out["full"] = score(loaded, bare, QUESTION, everything, codes, max_tokens)
    out["recent"] = score(loaded, bare, QUESTION, recent, codes, max_tokens)
    return out


def run(args) -> dict:
    from combllama.core.history import default_budget
    from combllama.core.model import ModelSpec, load_model
    from combllama.core.methods import default_method
    from combllama.sessions.store import SessionStore

    home = Path(tempfile.mkdtemp(prefix="long-chat-"))
    env = {**os.environ, "COMBLLAMA_HOME": str(home), "COMBLLAMA_NOHISTORY": "1"}
    os.environ.update(COMBLLAMA_HOME=str(home))
    loaded = load_model(ModelSpec(args.model, device=args.device))
    method = args.method or default_method(loaded).name
    budget = int(default_budget(loaded) * args.budget_fraction)
    session = "long-chat"
    store = SessionStore(home / "data" / "sessions.db")
    s = store.create(session)
    store.update_settings(s, {"method": method, "history_budget": budget})
    messages = script(args.turns)
    codes = distractors()
    stops = [c for c in CHECKPOINTS if c < args.turns] + [args.turns]
    probes, seconds, sent = [], 0.0, 0
    for stop in stops:
        seconds += chat(messages[sent:stop - 1], session, env, args.max_tokens, args.model, args.device)
        sent = stop - 1
        probes.append(probe(loaded, home, session, codes, args.answer_tokens))
        p = probes[-1]
        print(f"turn {p['turn']}: folded {p['folded']}, memory {p['memory_bytes'] / 2**20:.2f} of "
              f"{p['budget'] / 2**20:.2f} MiB · " + " · ".join(
                  f"{k} {'–' if not p[k]['fits'] else ('right' if p[k]['correct'] else 'wrong') + ' r' + str(p[k]['rank'])}"
                  for k in ("memory", "full", "recent")), flush=True)
    seconds += chat(messages[sent:], session, env, args.answer_tokens, args.model, args.device)
    turns = store.turns(session)
    last = turns[-1]
    usage = [t.usage for t in turns]
    result = {
        "turns": len(turns), "method": method, "model": loaded.name, "device": str(loaded.device),
        "budget_bytes": budget, "max_history_bytes": max(u.get("history_bytes", 0) for u in usage),
        "within_budget": all(u.get("history_bytes", 0) <= budget for u in usage),
        "folded_by_turn": [u.get("folded_turns", 0) for u in usage],
        "history_bytes_by_turn": [u.get("history_bytes", 0) for u in usage],
        "prompt_history_tokens_by_turn": [u.get("history_tokens", 0) for u in usage],
        "final": {"question": last.question, "answer": last.answer, "correct": CODE in last.answer},
        "probes": probes, "chat_seconds": round(seconds, 1), "args": vars(args), "codes": codes,
    }
    return result


def markdown(r: dict) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    lines = [f"# Long chat: {r['turns']} turns, {r['method']}, {r['model']} on {r['device']}", "",
             f"Turn 3 states the fact ({FACT!r}); turn {r['turns']} asks {QUESTION!r}.", "",
             f"- Turn {r['turns']} answer (the chat itself): {r['final']['answer']!r} — "
             f"{'right' if r['final']['correct'] else 'wrong'}.",
             f"- Session memory after every turn ≤ budget: {r['within_budget']} (largest {mib(r['max_history_bytes'])} "
             f"MiB of {mib(r['budget_bytes'])} MiB); turns folded at the end: {r['folded_by_turn'][-1]}.",
             f"- Chat wall time {r['chat_seconds']:.0f} s.", "",
             "Probes before turn t (off the record): answer right? · rank of the fact among 10 codes · log-prob margin.",
             "", "| turn | folded | memory MiB | memory | full history | recent turns only |", "|---|---|---|---|---|---|"]
    for p in r["probes"]:
        cell = lambda x: ("does not fit" if not x["fits"] else  # noqa: E731
                          f"{'right' if x['correct'] else 'wrong'} · {x['rank']} · {x['margin']:+.2f}")
        lines.append(f"| {p['turn']} | {p['folded']} | {mib(p['memory_bytes'])} | {cell(p['memory'])} | "
                     f"{cell(p['full'])} | {cell(p['recent'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m combllama.evals.long_chat", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--method", default=None, help="the session's method (default: the model's default)")
    ap.add_argument("--budget-fraction", type=float, default=1.0,
                    help="history budget as a fraction of the default (a quarter of the window's full KV)")
    ap.add_argument("--max-tokens", type=int, default=32, help="answer cap of the small-talk turns")
    ap.add_argument("--answer-tokens", type=int, default=24, help="answer cap of the probes and the last turn")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.turns < 4:
        ap.error("--turns must be at least 4")
    result = run(args)
    save(result, markdown(result), args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
