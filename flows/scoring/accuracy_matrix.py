"""The accuracy matrix R[i][j]: the score on task j of the model after release i, kept across
retrains in ``<workspace>/accuracy_matrix.json`` and drawn as a heatmap."""

from __future__ import annotations

import json
import math
from pathlib import Path


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def record_scores(path: Path, label: str, scores: dict[str, float], **info) -> dict:
    """Add ``scores`` to the row called ``label`` (created at the end if new). An entry already
    measured is kept: R[i][j] is the score when model i was first evaluated on task j."""
    matrix = load(path)
    row = next((r for r in matrix["rows"] if r["label"] == label), None)
    if row is None:
        row = {"label": label, "scores": {}}
        matrix["rows"].append(row)
    for task, score in scores.items():
        row["scores"].setdefault(task, score)
    row.update(info)
    path.write_text(json.dumps(matrix, indent=1))
    return matrix


def tasks(matrix: dict) -> list[str]:
    seen: list[str] = []
    for row in matrix["rows"]:
        seen += [t for t in row["scores"] if t not in seen]
    return seen


def plot(matrix: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = tasks(matrix)
    rows = matrix["rows"]
    grid = [[r["scores"].get(t, math.nan) for t in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(cols), 1.2 + 0.55 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    labels = [r["label"] + (" ★" if r.get("promoted") else "") for r in rows]
    ax.set_yticks(range(len(rows)), labels)
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xlabel("task scored")
    ax.set_ylabel("model (★ promoted)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title("Accuracy matrix R[i][j]")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
