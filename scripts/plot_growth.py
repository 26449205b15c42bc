#!/usr/bin/env python3
"""Draws the growth plots of BENCHMARKS.md from the benchmark's Markdown
tables (written by scripts/growth.sh):

    python3 scripts/plot_growth.py target/growth docs/growth
"""
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def tables(path):
    """Rows of every pair's table in one file: dicts keyed by column."""
    pair, head, rows = None, None, []
    for line in Path(path).read_text().splitlines():
        if line.startswith("### "):
            pair, head = line[4:].strip(), None
        elif line.startswith("| scenario") and pair:
            head = [c.strip() for c in line.strip("|").split("|")]
        elif line.startswith("|") and head and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == len(head):
                r = dict(zip(head, cells))
                r["pair"] = pair
                rows.append(r)
    return rows


def num(s):
    return float(re.sub(r"[^0-9.]", "", s))


def series(rows, scenario, x, y, where=lambda r: True):
    out = {}
    for r in rows:
        if r["scenario"] != scenario or not where(r):
            continue
        for side in ("ours", "raw"):
            col = f"{side}{y}" if y.startswith("/") else f"{side} {y}"
            out.setdefault((r["pair"], side), []).append((x(r), num(r[col])))
    return {k: sorted(v) for k, v in out.items()}


def draw(ax, data, title, xlabel, ylabel):
    for (pair, side), pts in sorted(data.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", linestyle="-" if side == "ours" else "--",
                label=f"{pair} {side}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2 if "concurrency" in xlabel else 10)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def main(src, dst):
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)

    def pair_of_panels(name, x, y, title, xlabel, ylabel):
        rows = tables(src / f"{name}.md")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, sc in zip(axes, ("read_hit", "write")):
            draw(ax, series(rows, sc, x, y), title.format(sc), xlabel, ylabel)
        fig.tight_layout()
        fig.savefig(dst / f"{name}.png", dpi=110)

    pair_of_panels("concurrency", lambda r: int(r["conc"]), "/s",
                   "{}, 256 B", "concurrency", "items/s")
    pair_of_panels("sizes", lambda r: num(r["value"]), "p50",
                   "{}, concurrency 1", "value size (bytes)", "p50 (µs)")

    rows, mem = [], {}
    for f in sorted(src.glob("keys-*.md")):
        k = int(f.stem.split("-")[1])
        for r in tables(f):
            r["keys"] = k
            rows.append(r)
            m = re.search(r"per entry: ours (\d+), raw (\d+)", r.get("note", ""))
            # RSS moves in allocator-sized steps: below 10^5 entries the
            # in-process figure is noise.
            if m and r["conc"] == "1" and (k >= 100_000 or not r["pair"].startswith("moka")):
                mem[(r["pair"], "ours")] = mem.get((r["pair"], "ours"), []) + [(k, int(m[1]))]
                mem[(r["pair"], "raw")] = mem.get((r["pair"], "raw"), []) + [(k, int(m[2]))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    draw(axes[0], series(rows, "read_hit", lambda r: r["keys"], "p50",
                         lambda r: r["conc"] == "1"),
         "read hit p50, 256 B, concurrency 1", "keys", "p50 (µs)")
    draw(axes[1], {k: sorted(v) for k, v in mem.items()},
         "cache memory per entry, 256 B", "keys", "bytes")
    fig.tight_layout()
    fig.savefig(dst / "keys.png", dpi=110)
    print(f"plots written to {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
