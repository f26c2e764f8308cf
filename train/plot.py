"""The training curve of train.py runs: KL to the full-context teacher and the student's and teacher's
next-token loss per step, from train_log.csv, as a PNG (dashed: the KL when every sample reads another
sample's memory, where the log has it; the gap between the two is what the memory is used for). Several logs
(a run and its --init continuations) are drawn one after another on a cumulative step axis, each with its label
and a dashed line where it starts; the logged points (one batch each, noisy) are drawn faintly under a rolling
mean of --smooth points.

    python -m combllama.train.plot RUN/train_log.csv train/results/curve.png
    python -m combllama.train.plot run-1/train_log.csv run-2a/train_log.csv run-2b/train_log.csv curve.png
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path


def rolling(values: list[float], n: int) -> list[float]:
    """Trailing mean over at most n points (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def plot(logs: list[Path], png: Path, labels: list[str] | None = None, smooth: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.8))
    offset = 0
    for i, log in enumerate(logs):
        rows = list(csv.DictReader(open(log)))
        step = [offset + int(r["step"]) for r in rows]
        label = labels[i] if labels else (log.parent.name if len(logs) > 1 else "")
        kl = [float(r["kl"]) for r in rows]
        ce = [float(r["ce"]) for r in rows]
        tce = [float(r["teacher_ce"]) for r in rows]
        color = f"C{i}"
        a.plot(step, kl, color=color, alpha=0.25, lw=0.8)
        a.plot(step, rolling(kl, smooth), color=color, label=f"{label} KL".strip())
        if rows and rows[0].get("kl_other"):  # logs from before the memory-use check lack it
            other = [float(r["kl_other"]) for r in rows]
            a.plot(step, rolling(other, smooth), color=color, ls="--",
                   label=f"{label} KL with another sample's memory".strip())
        b.plot(step, rolling(ce, smooth), color=color, label=f"{label} student CE".strip())
        b.plot(step, rolling(tce, smooth), color=color, ls=":", label=f"{label} teacher CE".strip())
        if i:
            for ax in (a, b):
                ax.axvline(offset, color="grey", ls="--", lw=0.8)
        offset = step[-1] + 1 if step else offset
    a.set_xlabel("step (cumulative)" if len(logs) > 1 else "step")
    a.set_ylabel("nats / token")
    a.set_title(f"KL(teacher ‖ student), rolling mean of {smooth}", fontsize=9)
    a.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    b.set_xlabel(a.get_xlabel())
    b.set_title(f"next-token CE, rolling mean of {smooth}", fontsize=9)
    b.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.suptitle("CombLlama adapter training")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m combllama.train.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="train_log.csv files in training order, then the PNG to write")
    ap.add_argument("--labels", default=None, help="comma-separated, one per log (default: the log's folder)")
    ap.add_argument("--smooth", type=int, default=8, help="rolling-mean window in logged points")
    args = ap.parse_args(argv)
    if len(args.paths) < 2:
        ap.error("need at least one train_log.csv and the PNG path")
    logs, png = [Path(p) for p in args.paths[:-1]], Path(args.paths[-1])
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(logs):
        ap.error("--labels needs one label per log")
    plot(logs, png, labels, max(1, args.smooth))


if __name__ == "__main__":
    main()
