"""`offpolicy ablate CONFIG`: one training run per cell of a grid (e.g. staleness.k x loss.name x
run.seed), run in parallel, resumable, then one table and two plots.

Reads: a config YAML whose `ablate:` section holds `grid` ({key: [values]}), `parallel` and
optionally `dir`, `threshold` (an eval reward: the table then also gives the samples each
cell needed to reach it), `base` (a config file, relative to this one, that the cells start
from) and `extra` ({"<grid key>=<value>": [overrides]}: settings for the cells with that value); the rest of the file is the base config of every cell (over `base`'s, key by key).
Writes, in the ablation folder (default `ablations/<config stem>`): `base.yaml`, one normal run
folder per cell (with its `train.log`), `results.csv`, `results.md`, `reward_vs_samples.png`,
`final_vs_k.png`. A cell whose `summary.json` says it finished is skipped on a rerun.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from offpolicy.config import ConfigError
from offpolicy.config_io import load_config
from offpolicy.report import eval_curve, mean_of, read_metrics


def load_ablation(path: str) -> tuple[dict, dict]:
    """(base config dict, ablate section) from the YAML; one-line ConfigError on bad input."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    spec = data.pop("ablate", None)
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise ConfigError(f"{path}: needs an `ablate:` section with `grid: {{key: [values]}}`")
    unknown = set(spec) - {"grid", "parallel", "dir", "threshold", "base", "extra"}
    if unknown:
        raise ConfigError(f"ablate: unknown keys {sorted(unknown)}; "
                          "valid: grid, parallel, dir, threshold, base, extra")
    for when, sets in (spec.get("extra") or {}).items():
        key, _, value = str(when).partition("=")
        if key not in spec["grid"] or not isinstance(sets, list):
            raise ConfigError(f"ablate.extra.{when}: expected '<grid key>=<value>: "
                              "[key=value, ...]' (overrides for the cells with that value)")
    if spec.get("base"):  # cells start from another config file; this file's keys win
        base_file = Path(path).parent / spec["base"]
        try:
            inherited = yaml.safe_load(base_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"ablate.base: cannot read {base_file}: "
                              f"{str(e).splitlines()[0]}") from None
        inherited.pop("ablate", None)  # its grid is its own
        data = _merged(inherited, data)
    if not isinstance(spec.get("threshold", 0.0), (int, float)):
        raise ConfigError("ablate.threshold: expected a number (an eval reward)")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"ablate.grid.{key}: expected a non-empty list")
    return data, spec


def _merged(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys set on it, nested sections merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = (_merged(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def cell_name(cell: dict) -> str:
    """`k4_tis_seed0` for {staleness.k: 4, loss.name: tis, run.seed: 0}; keys whose last parts
    clash keep their section: `tiny-seed1_run-seed0` for model.tiny.seed and run.seed."""
    lasts = [key.split(".")[-1] for key in cell]
    parts = []
    for (key, value), last in zip(cell.items(), lasts):
        if lasts.count(last) > 1:
            last = "-".join(key.split(".")[-2:])
        parts.append(str(value) if last == "name" else f"{last}{value}")
    return "_".join(parts)


def cell_done(run_dir: Path) -> bool:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return not s.get("interrupted") and s.get("final_eval_reward") is not None


def ablate(path: str, overrides: list[str], log=print) -> Path:
    base, spec = load_ablation(path)
    grid = spec["grid"]
    stem = Path(path).stem
    root = Path(spec.get("dir") or Path("ablations") / stem)
    root.mkdir(parents=True, exist_ok=True)
    base.setdefault("run", {})["name"] = root.name  # two files sharing a folder share cells
    base_path = root / "base.yaml"
    base_path.write_text(yaml.safe_dump(base, sort_keys=False))
    cells = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    steps, use_ray = {}, False
    for cell in cells:  # every cell's config is checked before anything runs
        cfg = load_config(base_path, cell_overrides(cell, spec, overrides))
        steps[cell_name(cell)] = cfg.learner.steps
        use_ray |= not cfg.resources.serial
    todo = [c for c in cells if not cell_done(root / cell_name(c))]
    parallel = max(1, int(spec.get("parallel", 1)))
    log(f"ablation {root}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
        f"{len(todo)} to run, {parallel} at a time")
    failed = _run_cells(root, base_path, lambda c: cell_overrides(c, spec, overrides),
                        _interleave(todo), parallel, steps, use_ray, log)
    rows = collect(root, cells, spec.get("threshold"))
    write_results(root, grid, rows, spec.get("threshold"))
    log(f"results: {root / 'results.csv'}, {root / 'results.md'}, plots in {root}")
    if failed:
        raise RuntimeError(f"{len(failed)} cell(s) failed: {', '.join(failed)} "
                           "(see their train.log); rerun to retry them")
    return root


def cell_overrides(cell: dict, spec: dict, overrides: list[str]) -> list[str]:
    """A cell's command-line overrides: the user's, `ablate.extra`'s for the cell's values
    (e.g. `loss.name=decoupled_ppo: [learner.minibatches=4]`), then the grid's."""
    extra = [o for when, sets in (spec.get("extra") or {}).items()
             for o in sets if str(cell.get(when.partition("=")[0])) == when.partition("=")[2]]
    return [*overrides, *extra, *(f"{k}={v}" for k, v in cell.items())]


def _run_cells(root: Path, base_path: Path, overrides, todo: list[dict],
               parallel: int, steps: dict[str, int], use_ray: bool, log) -> list[str]:
    """Run `offpolicy train` per cell, `parallel` at a time; progress every 10 s. Returns the
    names of the cells that failed."""
    pending, running, failed = list(todo), {}, []
    start, last, finished = time.time(), 0.0, 0
    env = _cell_environment(use_ray and bool(todo))
    restore = signal.signal(signal.SIGTERM, _raise_interrupt)  # stops the cells like Ctrl-C
    try:
        while pending or running:
            while pending and len(running) < parallel:
                cell = pending.pop(0)
                running[cell_name(cell)] = _start_cell(root, base_path, overrides(cell), cell,
                                                       env)
            for name, (proc, out, run_dir) in list(running.items()):
                if proc.poll() is not None:
                    out.close()
                    del running[name]
                    finished += 1
                    ok = proc.returncode == 0 and cell_done(run_dir)
                    failed += [] if ok else [name]
                    log(f"[{finished}/{len(todo)}] {name}: " + _outcome(run_dir, ok, proc))
            if time.time() - last >= 10 and running:
                last = time.time()
                log(_progress(running, finished, len(todo), steps, last - start))
            time.sleep(0.5)
    except KeyboardInterrupt:
        # SIGTERM, not SIGINT: a process started in the background ignores SIGINT, and each
        # run stops its own Ray roles on either.
        for proc, out, _ in running.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, out, _ in running.values():
            proc.wait(timeout=60)
            out.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, restore)
        if use_ray and todo:
            import ray

            ray.shutdown()
    return failed


def _cell_environment(start_ray: bool) -> dict:
    """The cells' environment. With Ray, one Ray instance serves every cell (each cell's run
    connects as its own job): its daemons start once, not once per cell. Serial cells need
    none, and no Ray is imported for them."""
    if not start_ray:
        return dict(os.environ)
    import ray

    from offpolicy.placement import private_ray_auth

    private_ray_auth()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
             configure_logging=True)
    # Copied after ray.init: Ray sets RAY_AUTH_MODE=token in this process when it turns on
    # token auth, and cells without it cannot join ("InvalidAuthToken").
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return env


def _start_cell(root: Path, base_path: Path, overrides: list[str], cell: dict, env: dict):
    """Start one cell's `offpolicy train` (with the cell's `overrides`) in its own session;
    (process, log file, run dir)."""
    run_dir = root / cell_name(cell)
    run_dir.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "offpolicy.cli", "train", str(base_path), *overrides,
           f"run.dir={run_dir}", "run.overwrite=true", "log.progress_every_s=30"]
    out = open(run_dir / "train.log", "w")
    return (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             env=env), out, run_dir)


def _outcome(run_dir: Path, ok: bool, proc) -> str:
    s = _summary(run_dir)
    if not ok:
        return f"FAILED (exit {proc.returncode})"
    return (f"eval {s.get('base_eval_reward', 0):.3f} -> {s['final_eval_reward']:.3f} "
            f"in {s.get('wall_s', 0):.0f}s")


def _progress(running: dict, finished: int, total: int, steps: dict[str, int],
              elapsed: float) -> str:
    """One progress line: cells done, each running cell's step, time and an estimate."""
    now = {n: _steps(r) for n, (_, _, r) in running.items()}
    # cells' worth of work done so far, running cells counted by their steps
    done = finished + sum(now[n] / steps[n] for n in now)
    eta = elapsed / done * (total - done) if done > 0.2 else None
    return (f"  {finished}/{total} done, running: "
            + ", ".join(f"{n} step {k}" for n, k in now.items())
            + f"; {elapsed / 60:.1f} min" + (f", about {eta / 60:.0f} min left" if eta else ""))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _interleave(cells: list[dict]) -> list[dict]:
    """Round-robin over the values of the grid's first key, ends first (k = 0, 256, 4, 64, 16,
    0, ...): a synchronous k = 0 cell leaves CPU idle between its steps, which a pipelined
    cell running beside it can use."""
    if not cells:
        return cells
    key = next(iter(cells[0]))
    values = list(dict.fromkeys(c[key] for c in cells))
    zigzag = list(dict.fromkeys(v for pair in zip(values, reversed(values)) for v in pair))
    by_value = [[c for c in cells if c[key] == v] for v in zigzag]
    return [c for row in itertools.zip_longest(*by_value) for c in row if c is not None]


def _steps(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _summary(run_dir: Path) -> dict:
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
        s, metrics = _summary(run_dir), read_metrics(run_dir)
        samples, rewards = eval_curve(s, metrics)
        auc = (sum((samples[i + 1] - samples[i]) * (rewards[i] + rewards[i + 1]) / 2
                   for i in range(len(samples) - 1)) / samples[-1]) if samples[-1] else 0.0
        rows.append({**cell, "final_eval_reward": s["final_eval_reward"],
                     "base_eval_reward": s["base_eval_reward"], "eval_auc": auc,
                     "samples": s["samples"], "wall_s": s["wall_s"],
                     "staleness_mean": s["staleness_mean"],
                     "ess_frac": mean_of(metrics, "is/ess_frac"),
                     "clip_frac": mean_of(metrics, "is/clip_frac")})
        if threshold is not None:
            rows[-1]["samples_to_threshold"] = next(
                (x for x, y in zip(samples, rewards) if y >= threshold), None)
    return rows


def write_results(root: Path, grid: dict, rows: list[dict],
                  threshold: float | None = None) -> None:
    if not rows:
        return
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # The first two grid keys other than run.seed are the table's axes; the rest are averaged.
    keys = [k for k in grid if k != "run.seed"] or list(grid)
    down, across = keys[0], keys[1] if len(keys) > 1 else None
    (root / "results.md").write_text(_table(rows, grid, down, across)
                                     + _threshold_table(rows, grid, down, across, threshold)
                                     + _runs_table(rows, grid))
    _plots(root, rows, grid, down, across)


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


def _threshold_table(rows, grid, down, across, threshold) -> str:
    """Samples trained until eval reward >= threshold: mean over the runs that got there."""
    if threshold is None:
        return ""
    cols = grid[across] if across else [None]
    lines = ["", f"Samples trained until the eval reward first reached {threshold} (mean over "
             "the runs that reached it; `k/n` = runs that reached it):", "",
             _header(down, cols, "samples to the threshold"), "|---|" + "---|" * len(cols)]
    for d in grid[down]:
        cells = []
        for c in cols:
            runs = _group(rows, **{down: d}, **({across: c} if across else {}))
            got = [r["samples_to_threshold"] for r in runs
                   if r["samples_to_threshold"] is not None]
            cells.append((f"{statistics.mean(got):,.0f} " if got else "not reached ")
                         + f"({len(got)}/{len(runs)})")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


def _plots(root: Path, rows: list[dict], grid: dict, down: str, across: str | None) -> None:
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
                run_dir = root / cell_name({k: r[k] for k in grid})
                curves.append(eval_curve(_summary(run_dir), read_metrics(run_dir)))
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
    fig.savefig(root / "reward_vs_samples.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = list(range(len(grid[down])))
    for c in cols:
        means, errs = [], [[], []]
        for d in grid[down]:
            vals = [r["final_eval_reward"] for r in _group(rows, **{down: d}, **(
                {across: c} if across else {}))]
            mean = statistics.mean(vals) if vals else float("nan")
            lo, hi = bootstrap_interval(vals) if len(vals) > 1 else (mean, mean)
            means.append(mean)
            errs[0].append(mean - lo)
            errs[1].append(hi - mean)
        ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=str(c))
    ax.set_xticks(xs, [str(d) for d in grid[down]])
    ax.set_xlabel(down)
    ax.set_ylabel("final eval reward (95% bootstrap interval)")
    ax.grid(alpha=0.3)
    if across:
        ax.legend(title=across, fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "final_vs_k.png", dpi=110)
    plt.close(fig)
