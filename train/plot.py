"""The training curve of a train.py run: KL to the full-context teacher and the student's and teacher's
next-token loss per step, from train_log.csv, as a PNG.

    python -m combllama.train.plot RUN/train_log.csv train/results/curve.png
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path


def plot(log: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(log)))
    step = [int(r["step"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(step, [float(r["kl"]) for r in rows], label="KL(teacher ‖ student)")
    a.set_xlabel("step")
    a.set_ylabel("nats / token")
    a.legend()
    b.plot(step, [float(r["ce"]) for r in rows], label="student CE (memory)")
    b.plot(step, [float(r["teacher_ce"]) for r in rows], label="teacher CE (full context)")
    b.set_xlabel("step")
    b.legend()
    fig.suptitle("CombLlama adapter training")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]))
