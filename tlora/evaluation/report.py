"""The protocol's results: one JSON row per finished job, results.csv, results.md (mean ± std per method),
is_vs_ts.png and, when asked, a W&B table."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from tlora.common.errors import UsageError
from tlora.common.files import atomic_write
from tlora.common.text_files import parse_json, read_text
from tlora.evaluation.manifest import Concept, Manifest, Method

COLUMNS = ("concept", "method", "kind", "IS", "DINO_IS", "TS_contextual", "TS_complex", "checkpoint")
METRICS = ("IS", "DINO_IS", "TS_contextual", "TS_complex")


def result_path(m: Manifest, concept: Concept, method: Method) -> Path:
    return m.output_dir / "results" / f"{concept.folder_name}__{method.folder_name}.json"


def collect(m: Manifest, write: bool = True) -> list[dict]:
    """Every finished job's row, in manifest order; rewrites results.csv when `write` (the main process)."""
    rows = [read_row(p) for c, me in m.jobs() if (p := result_path(m, c, me)).is_file()]
    if write:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(m.output_dir / "results.csv", buf.getvalue().encode())
    return rows


def read_row(path: Path) -> dict:
    """One finished job's row (the protocol wrote it; a hand-edited or damaged one is one line naming it)."""
    fix = "delete it to run that job again"
    text = read_text(path, "protocol result", fix)
    try:
        row = parse_json(text)
    except ValueError:  # not JSON
        row = None
    if not isinstance(row, dict) or any(k not in row for k in COLUMNS) or not all(
            row[k] is None or (isinstance(row[k], (int, float)) and not isinstance(row[k], bool)) for k in METRICS):
        raise UsageError(f"protocol result {path} is not a row the protocol writes (JSON with {', '.join(COLUMNS)}); "
                         f"{fix}")
    return row


def summary(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """method -> metric -> (mean, std over concepts)."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        values = {k: [r[k] for r in rows if r["method"] == method and r[k] is not None] for k in METRICS}
        out[method] = {k: (statistics.fmean(v), statistics.pstdev(v)) for k, v in values.items() if v}
    return out


def write_report(m: Manifest, rows: list[dict]) -> tuple[Path, Path]:
    """results.md (mean ± std per method) and is_vs_ts.png (one point per method)."""
    from tlora.evaluation.analysis import pyplot

    plt = pyplot()
    stats = summary(rows)
    lines = ["| method | concepts | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for method, s in stats.items():
        n = sum(r["method"] == method for r in rows)
        cells = [f"{s[k][0]:.4f} ± {s[k][1]:.4f}" if k in s else "" for k in METRICS]
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
    md = m.output_dir / "results.md"
    atomic_write(md, ("\n".join(lines) + "\n").encode())
    fig, ax = plt.subplots(figsize=(5, 4))
    for method, s in stats.items():
        if "IS" in s and "TS_contextual" in s:
            ax.scatter(s["TS_contextual"][0], s["IS"][0], s=40)
            ax.annotate(method, (s["TS_contextual"][0], s["IS"][0]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("TS (text similarity, contextual prompts)")
    ax.set_ylabel("IS (image similarity)")
    ax.set_title("Concept fidelity vs text alignment")
    fig.tight_layout()
    png = m.output_dir / "is_vs_ts.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md, png


def log_report(m: Manifest, png: Path, rows: list[dict]) -> None:
    """The rows and the plot as one W&B run named `protocol`, when the manifest reports to wandb."""
    if m.report_to != "wandb":
        return
    import wandb

    run = wandb.init(project=m.project_name, name="protocol", dir=str(m.output_dir))
    run.log({"results": wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows]),
             "is_vs_ts": wandb.Image(str(png))})
    run.finish()
