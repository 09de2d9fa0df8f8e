"""`offpolicy report RUN_DIR`: plots and a markdown summary of one run.

Reads: `RUN_DIR/metrics.jsonl`, `summary.json`. Writes: `RUN_DIR/report.png` (reward and eval,
staleness, importance-sampling diagnostics, throughput, over steps), for a run with episodes of
several segments `RUN_DIR/episodes.png` (staleness by segment position, the distribution of
episode lengths), for a run with `env.curriculum` `RUN_DIR/curriculum.png` (the length and the
pass rate over steps), and `RUN_DIR/report.md`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text()
                .splitlines() if line.strip()]
    except OSError:
        return []


def mean_of(metrics: list[dict], key: str) -> float | None:
    vals = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
    return statistics.mean(vals) if vals else None


def filtered_share(metrics: list[dict], window: int = 20) -> tuple[list[int], list[float]]:
    """(step, share of the groups that arrived in the last `window` steps which were dropped as
    uniform), from the cumulative `buffer/filtered` and `buffer/added` counts. A share near 1
    means the policy answers most prompts the same way every time: little signal is left."""
    rows = [(m["step"], m["buffer/filtered"], m["buffer/added"]) for m in metrics
            if "buffer/filtered" in m and "buffer/added" in m]
    out = ([], [])
    for (_, f0, a0), (step, f1, a1) in zip(rows, rows[window:]):
        arrived = a1 - a0  # `added` counts every arrival, the dropped ones included
        if arrived:
            out[0].append(step)
            out[1].append((f1 - f0) / arrived)
    return out


def eval_curve(summary: dict, metrics: list[dict]) -> tuple[list[float], list[float]]:
    """(samples trained, eval reward) at each evaluation, starting from the base model at 0."""
    xs, ys, samples = [0.0], [summary.get("base_eval_reward") or 0.0], 0
    for m in metrics:
        samples += m.get("learner/batch_size", 0)
        if m.get("eval/reward") is not None:
            xs.append(float(samples))
            ys.append(m["eval/reward"])
    return xs, ys


def _plot(metrics: list[dict], path: Path, base_eval: float | None = None) -> None:
    """The run's six panels: reward, staleness, importance sampling, throughput, entropy and
    KL, and the share of groups dropped as uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]

    def series(key):
        return [m.get(key) for m in metrics]

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    ax = axes[0][0]
    ax.plot(steps, series("rollout/reward_mean"), lw=0.6, alpha=0.6, label="batch reward")
    passk = [(m["step"], m["rollout/pass_at_k"]) for m in metrics if "rollout/pass_at_k" in m]
    if passk:
        ax.plot(*zip(*passk), lw=0.6, alpha=0.6, label="pass@k of arriving groups")
    # an eval is placed at the version it measured (it finishes a step or two later)
    ev = [(0, base_eval)] if base_eval is not None else []
    ev += [(m.get("eval/version", m["step"]), m["eval/reward"]) for m in metrics
           if m.get("eval/reward") is not None]
    if ev:
        ax.plot(*zip(*ev), marker="o", label="held-out eval (greedy)")
    ax.set_title("reward")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for key in ("staleness/min", "staleness/mean", "staleness/max"):
        ax.plot(steps, series(key), lw=0.8, label=key.split("/")[1])
    ax.set_title("staleness (learner version - token version)")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    for key in ("is/ess_frac", "is/clip_frac", "is/ratio_mean"):
        if any(v is not None for v in series(key)):
            ax.plot(steps, series(key), lw=0.8, label=key)
    ax.set_title("importance sampling")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    ax.plot(steps, series("throughput/samples_per_s"), lw=0.8)
    ax.set_title("trained samples/s (cumulative)")
    ax = axes[0][2]
    ax.plot(steps, series("learner/entropy"), lw=0.8, label="learner/entropy")
    if any(v is not None for v in series("kl/ref")):
        ax.plot(steps, series("kl/ref"), lw=0.8, label="kl/ref")
    ax.set_title("policy entropy (nats/token) and KL to the reference")
    ax.legend(fontsize=8)
    ax = axes[1][2]
    ax.plot(*filtered_share(metrics), lw=0.8)
    ax.set_title("share of arriving groups dropped as uniform (20 steps)")
    for a in axes.flat:
        a.set_xlabel("learner step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_episodes(metrics: list[dict], path: Path) -> bool:
    """Staleness by where a segment sits in its episode, and the episodes' lengths; False (no
    figure) when no episode had more than one segment."""
    quarters = [mean_of(metrics, f"staleness/segment_q{q}") for q in (1, 2, 3, 4)]
    if all(q is None for q in quarters):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist: dict[int, int] = {}
    for m in metrics:
        for b, n in (m.get("episode/segments_hist") or {}).items():
            hist[int(b)] = hist.get(int(b), 0) + n
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(["first quarter", "second", "third", "last quarter"],
                [q or 0.0 for q in quarters])
    axes[0].set_title("mean staleness by segment position in its episode")
    axes[0].set_ylabel("learner version - token version")
    bins = sorted(hist)
    axes[1].bar([str(b) for b in bins], [hist[b] for b in bins])
    axes[1].set_title("episodes by length (segments, from each power of 2)")
    axes[1].set_ylabel("episodes")
    for a in axes:
        a.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_curriculum(metrics: list[dict], path: Path) -> bool:
    """`env.curriculum`'s value (the training episodes' length) and its window's pass rate,
    beside the eval reward, over steps; False (no figure) for a run without a curriculum."""
    points = [(m["step"], m["curriculum/value"], m.get("curriculum/pass_rate"))
              for m in metrics if m.get("curriculum/value") is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].step([p[0] for p in points], [p[1] for p in points], where="post")
    axes[0].set_yscale("log", base=2)
    axes[0].set_title("curriculum: training episode length (calls)")
    rates = [(p[0], p[2]) for p in points if p[2] is not None]
    axes[1].plot([r[0] for r in rates], [r[1] for r in rates], lw=0.8, label="training pass rate")
    evals = [(m["step"], m["eval/reward"]) for m in metrics if m.get("eval/reward") is not None]
    axes[1].plot([e[0] for e in evals], [e[1] for e in evals], marker="o", label="eval reward")
    axes[1].axhline(0.5, color="grey", lw=0.6, ls="--")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_title("pass rate of the curriculum's window, and eval")
    axes[1].legend(fontsize=8)
    for a in axes:
        a.set_xlabel("learner step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if not metrics:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl with any step (not a run folder?)")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        summary = {}  # a run still going, or killed: plot what is there
    _plot(metrics, run_dir / "report.png", summary.get("base_eval_reward"))

    rows = [("steps", len(metrics)), ("base eval reward", summary.get("base_eval_reward")),
            ("final eval reward", summary.get("final_eval_reward")),
            ("samples trained", summary.get("samples")), ("wall time (s)", summary.get("wall_s")),
            ("staleness mean / max", f"{mean_of(metrics, 'staleness/mean'):.2f} / "
                                     f"{max(m['staleness/max'] for m in metrics):.0f}"),
            ("mean is/ess_frac", mean_of(metrics, "is/ess_frac")),
            ("mean learner/entropy", mean_of(metrics, "learner/entropy")),
            ("mean is/clip_frac", mean_of(metrics, "is/clip_frac")),
            ("mean engine/logprob_abs_diff", mean_of(metrics, "engine/logprob_abs_diff"))]
    lines = [f"# Run report: {run_dir}", "", "| | |", "|---|---|"]
    for name, value in rows:
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"| {name} | {'-' if value is None else value} |")
    lines += ["", "![report](report.png)", ""]
    if _plot_episodes(metrics, run_dir / "episodes.png"):
        lines += ["![episodes](episodes.png)", ""]
    if _plot_curriculum(metrics, run_dir / "curriculum.png"):
        lines += ["![curriculum](curriculum.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return run_dir / "report.md"
