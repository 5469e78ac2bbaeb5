"""Stage (coordinator): the per-domain loss table (anchor vs merged) from the published evaluations."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from stages.io import read_json, temp_path, write_json, write_text

MODELS = ("anchor", "merged")


def collect(evaluations: Path) -> list[dict]:
    rows = [read_json(p) for p in sorted(evaluations.glob("*.json"))]
    if not rows:
        raise SystemExit(f"report: no evaluation found under {evaluations}; run the evaluate stages first")
    # Public first, then owners in name order: the table reads the same way every run.
    return sorted(rows, key=lambda r: (r["domain"] != "public", r["domain"]))


def table_markdown(rows: list[dict]) -> str:
    lines = ["| domain | anchor loss | merged loss | change | anchor bpb | merged bpb |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, m = r["anchor"], r["merged"]
        change = (m["loss"] - a["loss"]) / a["loss"] * 100
        lines.append(f"| {r['domain']} | {a['loss']:.3f} | {m['loss']:.3f} | {change:+.1f}% | "
                     f"{a['bits_per_byte']:.3f} | {m['bits_per_byte']:.3f} |")
    owners = [r for r in rows if r["domain"] != "public"]
    if owners:
        mean = {k: sum(r[k]["loss"] for r in owners) / len(owners) for k in MODELS}
        lines.append(f"| owners' average | {mean['anchor']:.3f} | {mean['merged']:.3f} | "
                     f"{(mean['merged'] - mean['anchor']) / mean['anchor'] * 100:+.1f}% | | |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [r["domain"] for r in rows]
    x = range(len(domains))
    fig, ax = plt.subplots(figsize=(1.3 * len(domains) + 2, 3.6))
    for offset, name, color in ((-0.2, "anchor", "#9aa5b1"), (0.2, "merged", "#2f6fdf")):
        ax.bar([i + offset for i in x], [r[name]["loss"] for r in rows], width=0.4, label=name, color=color)
    ax.set_xticks(list(x), domains)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Held-out loss per domain: anchor vs merged FlexOlmo model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(evaluations: Path, out_dir: Path) -> dict:
    rows = collect(evaluations)
    summary = {r["domain"]: {m: {k: r[m][k] for k in ("loss", "bits_per_byte")} for m in MODELS} for r in rows}
    png = out_dir / "loss_by_domain.png"
    tmp = temp_path(png).with_suffix(".png")
    plot(rows, tmp)
    os.replace(tmp, png)
    write_text(out_dir / "eval_table.md", table_markdown(rows))
    write_json(out_dir / "eval.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--evaluations", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    report(args.evaluations, args.out)
    print((args.out / "eval_table.md").read_text(), end="")


if __name__ == "__main__":
    main()
