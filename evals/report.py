"""Writes a grid's results: results.json (everything), results.md (the table), results.png (quality
against measured memory fraction, one line per method, one panel per task metric)."""
from __future__ import annotations

import json
import math
from pathlib import Path

# (panel title, summary path, higher is better)
PANELS = [
    ("fidelity: top-1 agreement", ("fidelity", "top1"), True),
    ("fidelity: KL to full (nats/token)", ("fidelity", "kl"), False),
    ("retrieval: accuracy", ("retrieval", "accuracy"), True),
    ("QA: F1", ("qa", "f1"), True),
    ("citation: first source holds the needle", ("citation", "accuracy"), True),
    ("beyond the window: ppl / truncate ppl", ("fidelity_long", "ppl_vs_truncate"), False),
]


def _get(s: dict, path):
    v = s
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else None


def _fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and (abs(v) < 1e-3 and v != 0):
        return f"{v:.1e}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    m, mach = result["model"], result["machine"]
    lines = [f"# combllama evals: {m['name']}", "",
             f"- command: `{result['command']}`",
             f"- date: {result['date']}; wall time {result['seconds']} s",
             f"- machine: {mach['cpu']} ({mach['cores']} cores){'; GPU ' + mach['gpu'] if mach.get('gpu') else ''}",
             f"- model: {m['name']} `{m['fingerprint']}` ({m['dtype']}, {m['device']}, window {m['window']})",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v)
             + (f"; peers: " + ", ".join(f"{k} {v}" for k, v in result["peer_versions"].items())
                if result.get("peer_versions") else ""),
             f"- cases: " + ", ".join(f"{t} {sum(c['task'] == t for c in result['cases'])}"
                                       for t in ("fidelity", "retrieval", "qa")),
             "",
             "Budget = requested memory fraction; mem = measured stored KV entries / full KV entries. "
             "KL = mean next-token KL(full ‖ method) over teacher-forced continuation tokens; top-1 = share of "
             "tokens whose argmax matches full context; ppl = continuation perplexity (full context: "
             "ppl of `full`). Retrieval = RULER string_match_all; QA = SQuAD EM/F1 of the first answer line; "
             "citation = share of right retrieval answers whose first cited chunk holds the needle.", "",
             "| method | budget | mem | KL | top-1 | ppl | long ppl / truncate | retrieval | QA EM | QA F1 | citation | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        if not s["ok"]:
            why = "; ".join(s["not_applicable"] + s["errors"])[:120]
            lines.append(f"| {s['method']} | {s['budget']} | n/a | {why} |||||||| |")
            continue
        cit = s.get("citation") or {}
        cit_txt = _fmt(cit.get("accuracy"), 2) + (f" ({cit['right_answers']})" if "right_answers" in cit else "") \
            if "status" not in cit else "unavailable"
        if not cit:
            cit_txt = "–"
        lines.append("| " + " | ".join([
            s["method"], str(s["budget"]), _fmt(s.get("memory_fraction")),
            _fmt(_get(s, ("fidelity", "kl")), 4), _fmt(_get(s, ("fidelity", "top1"))),
            _fmt(_get(s, ("fidelity", "ppl")), 2), _fmt(_get(s, ("fidelity_long", "ppl_vs_truncate"))),
            _fmt(_get(s, ("retrieval", "accuracy")), 2), _fmt(_get(s, ("qa", "em")), 2), _fmt(_get(s, ("qa", "f1")), 2),
            cit_txt, _fmt(s.get("seconds"), 0) if s.get("seconds") is not None else "–"]) + " |")
    full = next((s for s in result["summary"] if s["method"] == "full" and s.get("fidelity")), None)
    if full:
        lines += ["", f"Full-context continuation perplexity: {_fmt(full['fidelity']['ppl_full'], 2)} "
                      f"over {full['fidelity']['tokens']} tokens."]
    ranked = [s for s in result["summary"] if s.get("average") is not None or _dict(s, "retrieval", "where_full_solves")]
    if ranked:
        lines += ["", "Averaged grid (mean of top-1, retrieval accuracy and QA F1) and the retrieval cases `full` solves:",
                  "", "| method | budget | average | solved where full solves | missed |", "|---|---|---|---|---|"]
        for s in ranked:
            w = _dict(s, "retrieval", "where_full_solves")
            lines.append(f"| {s['method']} | {s['budget']} | {_fmt(s.get('average'))} | "
                         + (f"{w['solved']} of {w['of']} | {', '.join(w['missed']) or '–'}" if w else "– | –") + " |")
    kinds = sorted({k for s in result["summary"] for k in (_dict(s, "retrieval", "by_kind"))})
    if kinds:
        lines += ["", "Retrieval by task:", "", "| method | budget | " + " | ".join(kinds) + " |",
                  "|---|---|" + "---|" * len(kinds)]
        for s in result["summary"]:
            bk = _dict(s, "retrieval", "by_kind")
            if bk:
                lines.append(f"| {s['method']} | {s['budget']} | " + " | ".join(_fmt(bk.get(k), 2) for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def _dict(s, a, b) -> dict:
    v = s.get(a) or {}
    return v.get(b) or {} if isinstance(v, dict) else {}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if any(_get(s, p[1]) is not None for s in result["summary"])]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    methods = list(dict.fromkeys(s["method"] for s in result["summary"]))
    colors = plt.get_cmap("tab20" if len(methods) > 10 else "tab10").colors  # one color per method, never reused
    for ax, (title, key, _) in zip(axes.flat, panels):
        for i, m in enumerate(methods):
            pts = sorted((s["memory_fraction"], _get(s, key)) for s in result["summary"]
                         if s["method"] == m and s.get("memory_fraction") is not None and _get(s, key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=colors[i % len(colors)])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("memory fraction (measured)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9)
    where = result["machine"].get("gpu") or result["machine"]["cpu"]
    fig.suptitle(f"{result['model']['name']} ({result['model']['dtype']}) · {result['date'][:10]} · {where}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(result: dict, md: str, out: Path) -> dict[str, Path]:
    """results.json and results.md under `out` (created): what every eval script leaves behind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(md)
    return paths


def write(result: dict, out: Path) -> dict[str, Path]:
    paths = {**save(result, markdown(result), out), "png": Path(out) / "results.png"}
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # e.g. the GPU machine: `python -m combllama.evals merge` draws it later
        del paths["png"]
        return paths
    plot(result, paths["png"])
    return paths
