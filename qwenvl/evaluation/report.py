"""The report: the seed's benchmark table with the evaluated model as a new row, in markdown, JSON
and a bar chart (PNG, matplotlib Agg)."""

import json
from pathlib import Path

# Column order and names of the seed's table.
COLUMNS = [("docvqa", "DocVQA"), ("chartqa", "ChartQA"), ("ai2d", "AI2D"), ("textvqa", "TextVQA"),
           ("mmmu", "MMMU"), ("mathvista", "MathVista"), ("mmbench_cn", "MM-Bench-CN")]

# Cited by its public address: the copy this table was read from sat on a developer's machine, whose
# path means nothing to a report's reader.
SEED_SOURCE = ("the 'Introducing Qwen-VL' blog post (Qwen team, 2024-01-25, https://qwenlm.github.io/blog/qwen-vl/), "
               "its benchmark table")
# Every number below is copied from that table, row by row. Superscripts 1/2/3 there are printed
# without explanation and are left out. The seed gives no numbers for the open Qwen-VL / Qwen-VL-Chat
# models (only the API models Qwen-VL-Plus and Qwen-VL-Max), so none are shown for them.
REFERENCE_ROWS = [
    ("Other best open-source LVLM", [81.6, 68.4, 73.7, 76.1, 45.9, 36.7, 72.4],
     "CogAgent / CogAgent / Fuyu-Medium / CogAgent / Yi-VL-34B / SPHINX-V2 / InternLM-XComposer-VL"),
    ("Gemini Pro", [88.1, 74.1, 73.9, 74.6, 47.9, 45.2, 74.3], ""),
    ("Gemini Ultra", [90.9, 80.8, 79.5, 82.3, 59.4, 53.0, None], "MM-Bench-CN: '-' in the post"),
    ("GPT-4V", [88.4, 78.5, 78.2, 78.0, 56.8, 49.9, 73.9], ""),
    ("Qwen-VL-Plus", [91.4, 78.1, 75.9, 78.9, 45.2, 43.3, 68.0], ""),
    ("Qwen-VL-Max", [93.1, 79.8, 79.3, 79.5, 51.4, 50.0, 75.1], ""),
]


def build_report(summary: dict, model_name: str) -> dict:
    """summary: {benchmark: {"score": 0..100, "n"}} as score.score_records returns it."""
    model_row = {"model": model_name, "source": "this run",
                 "scores": {k: (round(summary[k]["score"], 2) if k in summary else None) for k, _ in COLUMNS},
                 "n": {k: summary[k]["n"] for k, _ in COLUMNS if k in summary}}
    refs = [{"model": name, "source": SEED_SOURCE + (f"; {note}" if note else ""),
             "scores": dict(zip((k for k, _ in COLUMNS), values))} for name, values, note in REFERENCE_ROWS]
    return {"columns": [{"key": k, "title": t} for k, t in COLUMNS], "rows": [model_row] + refs}


def _cell(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def to_markdown(report: dict) -> str:
    cols = report["columns"]
    lines = ["| Model | " + " | ".join(c["title"] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for row in report["rows"]:
        lines.append(f"| {row['model']} | " + " | ".join(_cell(row["scores"][c["key"]]) for c in cols) + " |")
    model = report["rows"][0]
    n = ", ".join(f"{k}: {v}" for k, v in model["n"].items())
    lines += ["", f"{model['model']}: this run ({n} scored items; MM-Bench-CN counts circular groups).",
              f"Reference rows: {SEED_SOURCE}. The post gives no numbers for the open Qwen-VL / "
              "Qwen-VL-Chat checkpoints, so no row is shown for them.",
              f"Other best open-source LVLM, per column: {REFERENCE_ROWS[0][2]}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = report["columns"]
    rows = report["rows"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        ys = [float("nan") if row["scores"][c["key"]] is None else row["scores"][c["key"]] for c in cols]
        bars = ax.bar(xs, ys, width, label=row["model"], edgecolor="black" if i == 0 else None,
                      linewidth=1.2 if i == 0 else 0)
        if i == 0:
            for b, v in zip(bars, (row["scores"][c["key"]] for c in cols)):
                if v is not None:
                    ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(cols)), [c["title"] for c in cols])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_title("Benchmarks of the Qwen-VL blog post (reference rows) and this run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(summary: dict, out_dir, model_name: str) -> dict:
    """Writes report.md, report.json and report.png into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(summary, model_name)
    paths = {"md": out / "report.md", "json": out / "report.json", "png": out / "report.png"}
    paths["md"].write_text(to_markdown(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    plot(report, paths["png"])
    return paths
