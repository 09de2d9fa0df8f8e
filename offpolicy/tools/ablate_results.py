"""The results of `offpolicy ablate`: one row per finished cell, `results.csv`, the tables of
`results.md` (means with 95% bootstrap intervals, marks for cells apart from k = 0, samples to
a threshold, every run) and the two plots.

Reads: each cell's `summary.json` and `metrics.jsonl`. Writes: `results.csv`, `results.md`,
`reward_vs_samples.png`, `final_vs_k.png` in the ablation folder.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from pathlib import Path

from offpolicy.tools.report import eval_curve, mean_of, read_metrics


def cell_name(cell: dict) -> str:
    """`k4_tis_seed0` for {staleness.k: 4, loss.name: tis, run.seed: 0}; keys whose last parts
    clash keep their section: `tiny-seed1_run-seed0` for model.tiny.seed and run.seed."""
    lasts = [key.split(".")[-1] for key in cell]
    parts = []
    for (key, value), last in zip(cell.items(), lasts):
        if lasts.count(last) > 1:
            last = "-".join(key.split(".")[-2:])
        value = "none" if value == "" else value  # e.g. env.curriculum.knob off
        parts.append(str(value) if last == "name" else f"{last}{value}")
    return "_".join(parts)


def cell_done(run_dir: Path) -> bool:
    """Whether the cell's run finished (its summary says so); a rerun skips it."""
    s = run_summary(run_dir)
    return bool(s) and not s.get("interrupted") and s.get("final_eval_reward") is not None


def run_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def collect(root: Path, cells: list[dict], threshold: float | None = None) -> list[dict]:
    """One row per finished cell: its grid values and the run's results (with `threshold`,
    also the samples trained at the first eval at or above it; None if never reached)."""
    rows = []
    for cell in cells:
        run_dir = root / cell_name(cell)
        if not cell_done(run_dir):
            continue
        s, metrics = run_summary(run_dir), read_metrics(run_dir)
        samples, rewards = eval_curve(s, metrics)
        auc = (sum((samples[i + 1] - samples[i]) * (rewards[i] + rewards[i + 1]) / 2
                   for i in range(len(samples) - 1)) / samples[-1]) if samples[-1] else 0.0
        rows.append({**cell, "cell": cell_name(cell), "final_eval_reward": s["final_eval_reward"],
                     "base_eval_reward": s.get("base_eval_reward", math.nan), "eval_auc": auc,
                     "samples": s["samples"], "wall_s": s["wall_s"],
                     "staleness_mean": s["staleness_mean"],
                     "ess_frac": mean_of(metrics, "is/ess_frac"),
                     "clip_frac": mean_of(metrics, "is/clip_frac"),
                     "kl_k3": mean_of(metrics, "is/kl_k3"),
                     "versions_spanned_max": max((m.get("episode/versions_spanned_max", 0) or 0
                                                  for m in metrics), default=0),
                     **{f"{k}_q{q}": mean_of(metrics, f"is/{k}_q{q}") for q in (1, 4)
                        for k in ("ess_frac", "clip_frac", "kl_k3")}})
        if threshold is not None:
            rows[-1]["samples_to_threshold"] = next(
                (x for x, y in zip(samples, rewards) if y >= threshold), None)
    return rows


def write_results(root: Path, grid: dict, rows: list[dict], threshold: float | None = None,
                  name: str = "") -> str:
    """`results.csv`, `results.md` and the plots of one grid (`results_<name>.*` for a named
    one); returns the tables' text. The last grid key other than run.seed is the tables'
    columns; the others before it together are their rows (`a, b`); seeds are averaged."""
    if not rows:
        return ""
    suffix = f"_{name}" if name else ""
    with open(root / f"results{suffix}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    keys = [k for k in grid if k != "run.seed"] or list(grid)
    if len(keys) > 2:  # several row keys: one combined row label
        grid, rows = _combined(grid, rows, keys[:-1])
        keys = [k for k in grid if k != "run.seed"]
    down, across = keys[0], keys[1] if len(keys) > 1 else None
    text = ((f"## Grid `{name}`\n\n" if name else "") + _table(rows, grid, down, across)
            + _threshold_table(rows, grid, down, across, threshold)
            + _diagnostics_table(rows, grid, down, across)
            + _position_table(rows, grid, down, across) + _runs_table(rows, grid))
    (root / f"results{suffix}.md").write_text(text)
    _plots(root, rows, grid, down, across, suffix)
    return text


def _combined(grid: dict, rows: list[dict], keys: list[str]) -> tuple[dict, list[dict]]:
    """The grid and rows with `keys` merged into one key `a, b` of values `x, y`."""
    label = ", ".join(keys)
    combos = [", ".join(str(v) if v != "" else "none" for v in combo)
              for combo in itertools.product(*(grid[k] for k in keys))]
    out = {label: combos, **{k: v for k, v in grid.items() if k not in keys}}
    return out, [{**r, label: ", ".join(str(r[k]) if r[k] != "" else "none" for k in keys)}
                 for r in rows]


def _group(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _table(rows: list[dict], grid: dict, down: str, across: str | None) -> str:
    """Final eval reward and area under the eval curve, `down` x `across`: the mean over the
    other grid keys (seeds) with a 95% bootstrap interval; a cell whose interval lies wholly
    below (v) or above (^) the first row's of its column (k = 0) is marked."""
    cols = grid[across] if across else [None]
    first = grid[down][0]
    intro = (f"Mean over {_others(grid, down, across)} with a 95% bootstrap interval "
             f"[low, high] (n = runs per cell). Rows: `{down}`"
             + (f"; columns: `{across}`" if across else "")
             + f". v / ^: the interval lies wholly below / above the `{down}` = {first} row's "
             "in the same column.")
    lines = [intro, ""]
    for key, title in (("final_eval_reward", "final eval reward"),
                       ("eval_auc", "area under the eval curve (mean eval reward over the "
                                    "run's samples)")):
        lines += [f"{title[0].upper()}{title[1:]}:", "", _header(down, cols, title),
                  "|---|" + "---|" * len(cols)]
        for d in grid[down]:
            cells = []
            for c in cols:
                where = {across: c} if across else {}
                vals = [r[key] for r in _group(rows, **{down: d}, **where)]
                ref = [r[key] for r in _group(rows, **{down: first}, **where)]
                cells.append(_fmt(vals) + ("" if d == first else _mark(vals, ref)))
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def bootstrap_interval(vals: list[float], level: float = 0.95, resamples: int = 4000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (fixed seed: the table is reproducible)."""
    import numpy as np

    x = np.asarray(vals, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (resamples, len(x)))].mean(1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def _mark(vals: list[float], ref: list[float]) -> str:
    """' v' / ' ^' when the bootstrap intervals of vals and ref do not overlap."""
    if len(vals) < 2 or len(ref) < 2:
        return ""
    lo, hi = bootstrap_interval(vals)
    ref_lo, ref_hi = bootstrap_interval(ref)
    return " v" if hi < ref_lo else " ^" if lo > ref_hi else ""


def _runs_table(rows: list[dict], grid: dict) -> str:
    """Every run on its own line: the spread behind the means, and the worst run."""
    lines = ["", "Every run:", "", "| " + " | ".join(f"`{k}`" for k in grid)
             + " | base eval | final eval | wall (s) |", "|---" * (len(grid) + 3) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for k in grid)
                     + f" | {r['base_eval_reward']:.3f} | {r['final_eval_reward']:.3f} | "
                       f"{r['wall_s']:.0f} |")
    finals = [r["final_eval_reward"] for r in rows]
    lines += ["", f"{len(rows)} runs: final eval min {min(finals):.3f}, mean "
                  f"{statistics.mean(finals):.3f}, max {max(finals):.3f}.", ""]
    return "\n".join(lines)


def _grid_table(rows, grid, down, across, intro: str, single: str, cell) -> str:
    """A table with a row per `down` value and a column per `across` value (or one column
    named `single`): `cell(runs)` of the runs of each (runs, possibly none, over the seeds)."""
    cols = grid[across] if across else [None]
    lines = ["", intro, "", _header(down, cols, single), "|---|" + "---|" * len(cols)]
    for d in grid[down]:
        lines.append(f"| {d} | " + " | ".join(
            cell(_group(rows, **{down: d}, **({across: c} if across else {}))) for c in cols)
            + " |")
    return "\n".join(lines) + "\n"


def _avg(runs, key: str, fmt: str = ".3g") -> str:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return format(max(statistics.mean(vals), 0.0), fmt) if vals else "-"  # -1e-9: rounding


def _threshold_table(rows, grid, down, across, threshold) -> str:
    """Samples trained until eval reward >= threshold: mean over the runs that got there."""
    if threshold is None:
        return ""

    def cell(runs):
        got = [r["samples_to_threshold"] for r in runs if r["samples_to_threshold"] is not None]
        return (f"{statistics.mean(got):,.0f} " if got else "not reached ") + \
            f"({len(got)}/{len(runs)})"
    return _grid_table(rows, grid, down, across,
                       f"Samples trained until the eval reward first reached {threshold} (mean "
                       "over the runs that reached it; `k/n` = runs that reached it):",
                       "samples to the threshold", cell)


def _diagnostics_table(rows, grid, down, across) -> str:
    """Why a correction holds or fails: the run-mean `is/ess_frac`, `is/clip_frac` and
    `is/kl_k3` (KL between the behaviour and current policy), averaged over the seeds."""
    return _grid_table(rows, grid, down, across,
                       "Importance diagnostics, run means averaged over the seeds: ESS fraction "
                       "/ clip fraction / KL(mu, pi) k3:", "ESS / clip / KL",
                       lambda runs: " / ".join(_avg(runs, k) for k in
                                               ("ess_frac", "clip_frac", "kl_k3")) if runs else "-")


def _position_table(rows, grid, down, across) -> str:
    """Where in long episodes the off-policy tokens sit: the run-mean ESS fraction, clip
    fraction and KL of the first and last quarter of the episodes' segments, and the most
    versions one episode spanned, averaged over the seeds; "" without multi-segment runs."""
    if not any(r.get("ess_frac_q4") is not None for r in rows):
        return ""

    def cell(runs):
        if not runs:
            return "-"
        return "; ".join(_avg(runs, f"{k}_q1", f) + " -> " + _avg(runs, f"{k}_q4", f) for k, f in
                         (("ess_frac", ".3f"), ("clip_frac", ".3f"), ("kl_k3", ".2g"))) \
            + f"; {_avg(runs, 'versions_spanned_max', '.0f')}"
    return _grid_table(rows, grid, down, across,
                       "By segment position, first quarter -> last quarter of the episodes, run "
                       "means averaged over the seeds: ESS fraction; clip fraction; KL k3; the "
                       "most versions one episode spanned:", "ESS; clip; KL; spanned", cell)


def _header(down: str, cols: list, single: str) -> str:
    """A table's header row: the `across` values, or one column named `single`."""
    names = [single] if cols == [None] else [str(c) for c in cols]
    return f"| {down} | " + " | ".join(names) + " |"


def _others(grid, down, across) -> str:
    rest = [k for k in grid if k not in (down, across)]
    return ", ".join(f"`{k}`" for k in rest) or "one run"


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f} (n=1)"
    lo, hi = bootstrap_interval(vals)
    return f"{statistics.mean(vals):.3f} [{lo:.3f}, {hi:.3f}] (n={len(vals)})"


def _plots(root: Path, rows: list[dict], grid: dict, down: str, across: str | None,
           suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = grid[across] if across else [None]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6), squeeze=False,
                             sharey=True)
    for ax, c in zip(axes[0], cols):
        for d in grid[down]:
            curves = []
            for r in _group(rows, **{down: d}, **({across: c} if across else {})):
                run_dir = root / r["cell"]
                curves.append(eval_curve(run_summary(run_dir), read_metrics(run_dir)))
            if curves:
                n = min(len(x) for x, _ in curves)
                xs = curves[0][0][:n]
                ys = [statistics.mean(y[i] for _, y in curves) for i in range(n)]
                ax.plot(xs, ys, marker=".", label=f"{down.split('.')[-1]}={d}")
        ax.set_title(f"{across}={c}" if across else "")
        ax.set_xlabel("samples trained")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("eval reward (mean over seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / f"reward_vs_samples{suffix}.png", dpi=110)
    plt.close(fig)

    combined = ", " in down  # rows that are combinations: categories, not a scale
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(grid[down])), 3.8))
    for i, c in enumerate(cols):
        xs = [x + (0.08 * (i - (len(cols) - 1) / 2) if combined else 0.0)
              for x in range(len(grid[down]))]
        means, errs = [], [[], []]
        for d in grid[down]:
            vals = [r["final_eval_reward"] for r in _group(rows, **{down: d}, **(
                {across: c} if across else {}))]
            mean = statistics.mean(vals) if vals else float("nan")
            lo, hi = bootstrap_interval(vals) if len(vals) > 1 else (mean, mean)
            means.append(mean)
            errs[0].append(mean - lo)
            errs[1].append(hi - mean)
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=str(c),
                    ls="none" if combined else "-")
    ax.set_xticks(range(len(grid[down])), [str(d) for d in grid[down]],
                  rotation=25 if combined else 0, ha="right" if combined else "center")
    ax.set_xlabel(down)
    ax.set_ylabel("final eval reward (95% bootstrap interval)")
    ax.grid(alpha=0.3)
    if across:
        ax.legend(title=across, fontsize=8)
    fig.tight_layout()
    fig.savefig(root / f"final_vs_k{suffix}.png", dpi=110)
    plt.close(fig)
