"""Lag mode on the live Ray system, and `offpolicy ablate`: grid, resume, results, plots."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from offpolicy.tools.ablate import ablate, cell_name, load_ablation
from offpolicy.core.errors import ConfigError
from offpolicy.runtime.validate import load_config
from offpolicy.runtime.launch import train
from offpolicy.tools.report import report

from conftest import fast_config


@pytest.mark.ray
def test_lag_mode_staleness_is_exactly_k(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = fast_config(model_dir, f"run.dir={run_dir}", "staleness.mode=lag", "staleness.k=3",
                      "learner.steps=9", "eval.every=9")
    summary = train(cfg, log=lambda *a: None)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 9 and summary["steps"] == 9
    for t, m in enumerate(metrics):  # step t trains on version max(0, t - 3) only
        assert m["staleness/min"] == m["staleness/max"] == min(t, 3), (t, m["staleness/hist"])
    # Every step re-scored its tokens with the (old) weights that generated them.
    assert all(m["engine/logprob_abs_diff"] < 1e-4 for m in metrics)
    out = report(run_dir)
    assert "final eval reward" in out.read_text() and (run_dir / "report.png").stat().st_size
    assert "| mean learner/entropy | " in out.read_text()  # and plotted beside kl/ref


def test_serial_layout_lag_mode_is_exact_without_ray(model_dir, tmp_path):
    """resources.serial: the same roles in one process; lag mode still gives exactly t - k."""
    run_dir = tmp_path / "run"
    cfg = fast_config(model_dir, f"run.dir={run_dir}", "staleness.mode=lag", "staleness.k=2",
                      "learner.steps=7", "eval.every=7", "resources.serial=true")
    summary = train(cfg, log=lambda *a: None)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["staleness/min"], m["staleness/max"]) for m in metrics] == [
        (min(t, 2), min(t, 2)) for t in range(7)]
    # v1..v4 for the work orders, then v7 for the final eval on the same engine
    assert summary["steps"] == 7 and summary["actors"][0]["weight_loads"] == 5
    assert (run_dir / "checkpoints" / "final" / "config.json").exists()
    with pytest.raises(ConfigError, match="resources.serial"):
        fast_config(model_dir, "resources.serial=true", "engine.weight_sync=filesystem")


@pytest.mark.ray
def test_bound_mode_holds_off_actors_under_a_slow_learner(model_dir, tmp_path):
    """One-row micro-batches make the learner several times slower than the actor: admission
    must hold the actor off (counted) and the bound must hold at every step."""
    run_dir = tmp_path / "run"
    cfg = fast_config(model_dir, f"run.dir={run_dir}", "buffer.max_staleness=1",
                      "learner.steps=12", "learner.micro_batch=1", "learner.batch_groups=8",
                      "eval.every=12")
    summary = train(cfg, log=lambda *a: None)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m["staleness/max"] for m in metrics) <= 1
    assert summary["buffer"]["buffer/held_off"] > 0 and summary["buffer"]["buffer/held_off_s"] > 0


def test_ablation_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: {steps: 2}\n")
    with pytest.raises(ConfigError, match="ablate"):
        load_ablation(str(bad))
    bad.write_text("ablate: {grid: {staleness.k: 3}}\n")
    with pytest.raises(ConfigError, match="non-empty list"):
        load_ablation(str(bad))
    bad.write_text("ablate: {grid: {staleness.k: [0]}, paralel: 2}\n")
    with pytest.raises(ConfigError, match="paralel"):
        load_ablation(str(bad))


@pytest.mark.ray
def test_ablate_runs_the_grid_resumes_and_writes_results(model_dir, tmp_path, monkeypatch):
    # As in a fresh `offpolicy ablate` process: Ray turns token auth on in this process only
    # at ray.init, and the cells must still be able to join (an earlier test may have set it).
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    spec = {"model": {"path": str(model_dir)}, "learner": {"steps": 3, "batch_groups": 2},
            "rollout": {"prompts_per_batch": 2, "group_size": 4}, "eval": {"every": 3},
            "env": {"eval_size": 8}, "staleness": {"mode": "lag"},
            "resources": {"actor_cpus": 0.5, "learner_cpus": 0.5},
            "ablate": {"grid": {"staleness.k": [0, 2], "loss.name": ["pg", "tis"]},
                       "parallel": 2, "dir": str(tmp_path / "abl")}}
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # grid order: k down, loss across
    lines = []
    root = ablate(str(path), [], log=lines.append)
    names = [cell_name({"staleness.k": k, "loss.name": n}) for k in (0, 2) for n in ("pg", "tis")]
    assert names[0] == "k0_pg"
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert sorted((r["staleness.k"], r["loss.name"]) for r in rows) == [
        ("0", "pg"), ("0", "tis"), ("2", "pg"), ("2", "tis")]
    assert all(float(r["samples"]) == 3 * 2 * 4 for r in rows)
    table = (root / "results.md").read_text()
    assert "| staleness.k | pg | tis |" in table and "(n=1)" in table
    assert (root / "reward_vs_samples.png").stat().st_size and (root / "final_vs_k.png").stat().st_size
    # Rerun: nothing to do. Then one cell loses its summary: only it runs again.
    stamp = {n: (root / n / "summary.json").stat().st_mtime for n in names}
    lines.clear()
    ablate(str(path), [], log=lines.append)
    assert "0 to run" in lines[0]
    (root / "k2_tis" / "summary.json").unlink()
    lines.clear()
    ablate(str(path), [], log=lines.append)
    assert "1 to run" in lines[0]
    assert all((root / n / "summary.json").stat().st_mtime == stamp[n] for n in names[:3])
    assert load_config(root / "base.yaml").staleness.mode == "lag"


def test_threshold_gives_samples_to_reach_it(tmp_path):
    """Synthetic run folders: eval 0.2 at 0 samples, then per seed a curve; threshold 0.5."""
    from offpolicy.tools.ablate_results import collect, write_results

    grid = {"buffer.sampler": ["fifo", "uniform"], "run.seed": [0, 1]}
    curves = {("fifo", 0): [0.3, 0.5, 0.7], ("fifo", 1): [0.6, 0.6, 0.6],
              ("uniform", 0): [0.3, 0.4, 0.4], ("uniform", 1): [0.3, 0.4, 0.45]}
    cells = [{"buffer.sampler": s, "run.seed": k} for s in grid["buffer.sampler"] for k in (0, 1)]
    for cell in cells:
        d = tmp_path / cell_name(cell)
        d.mkdir()
        evals = curves[(cell["buffer.sampler"], cell["run.seed"])]
        (d / "summary.json").write_text(json.dumps({
            "final_eval_reward": evals[-1], "base_eval_reward": 0.2, "samples": 300,
            "wall_s": 1.0, "staleness_mean": 1.0, "interrupted": False}))
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "learner/batch_size": 100, "eval/reward": r}) + "\n"
            for i, r in enumerate(evals)))
    rows = collect(tmp_path, cells, threshold=0.5)
    got = {(r["buffer.sampler"], r["run.seed"]): r["samples_to_threshold"] for r in rows}
    assert got == {("fifo", 0): 200.0, ("fifo", 1): 100.0, ("uniform", 0): None,
                   ("uniform", 1): None}
    write_results(tmp_path, grid, rows, threshold=0.5)
    table = (tmp_path / "results.md").read_text()
    assert "| fifo | 150 (2/2) |" in table  # seeds are averaged, never a table axis
    assert "| uniform | not reached (0/2) |" in table
    assert "Every run:" in table and "| uniform | 1 | 0.200 | 0.450 | 1 |" in table
    assert "4 runs: final eval min 0.400, mean 0.537, max 0.700." in table


def test_ablate_base_inherits_a_config_and_names_clashing_keys(tmp_path):
    """`ablate.base` cells start from another config; this file's keys win, section by
    section. Keys that end alike (model.tiny.seed, run.seed) keep their section in names."""
    (tmp_path / "parent.yaml").write_text(
        "learner: {steps: 7, lr: 0.5}\nbuffer: {max_staleness: 3}\n")
    (tmp_path / "grid.yaml").write_text(
        "ablate:\n  base: parent.yaml\n  grid: {model.tiny.seed: [0, 1], run.seed: [0]}\n"
        "learner: {lr: 0.25}\n")
    base, spec = load_ablation(str(tmp_path / "grid.yaml"))
    assert base == {"learner": {"steps": 7, "lr": 0.25}, "buffer": {"max_staleness": 3}}
    assert cell_name({"model.tiny.seed": 1, "run.seed": 0}) == "tiny-seed1_run-seed0"
    (tmp_path / "grid.yaml").write_text("ablate: {base: nope.yaml, grid: {run.seed: [0]}}\n")
    with pytest.raises(ConfigError, match="ablate.base: cannot read .*nope.yaml"):
        load_ablation(str(tmp_path / "grid.yaml"))


def test_bootstrap_intervals_mark_cells_that_differ_from_k0(tmp_path):
    from offpolicy.tools.ablate_results import _table, bootstrap_interval

    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    lo, hi = bootstrap_interval([0.2, 0.4, 0.6])
    assert 0.2 <= lo < 0.4 < hi <= 0.6
    grid = {"staleness.k": [0, 64, 256], "loss.name": ["pg"], "run.seed": [0, 1, 2]}
    finals = {0: [0.90, 0.92, 0.88], 64: [0.85, 0.93, 0.89], 256: [0.30, 0.35, 0.32]}
    rows = [{"staleness.k": k, "loss.name": "pg", "run.seed": i, "final_eval_reward": v,
             "eval_auc": v} for k, vals in finals.items() for i, v in enumerate(vals)]
    table = _table(rows, grid, "staleness.k", "loss.name")
    line = {ln.split(" |")[0]: ln for ln in table.splitlines() if ln.startswith("| ")}
    assert line["| 256"].endswith(" v |") and not line["| 64"].endswith(" v |")
    assert "0.900 [0.880, 0.920] (n=3)" in line["| 0"]


def test_ablate_extra_sets_overrides_for_the_cells_with_a_value(tmp_path):
    from offpolicy.tools.ablate import cell_overrides

    (tmp_path / "grid.yaml").write_text(
        "ablate:\n  grid: {loss.name: [pg, decoupled_ppo]}\n"
        "  extra: {loss.name=decoupled_ppo: [learner.minibatches=4]}\n")
    _, spec = load_ablation(str(tmp_path / "grid.yaml"))
    assert cell_overrides({"loss.name": "decoupled_ppo"}, spec, ["a=1"]) == [
        "a=1", "learner.minibatches=4", "loss.name=decoupled_ppo"]
    assert cell_overrides({"loss.name": "pg"}, spec, []) == ["loss.name=pg"]
    (tmp_path / "grid.yaml").write_text(
        "ablate:\n  grid: {loss.name: [pg]}\n  extra: {staleness.k=0: [learner.lr=1]}\n")
    with pytest.raises(ConfigError, match="ablate.extra.staleness.k=0: expected"):
        load_ablation(str(tmp_path / "grid.yaml"))


def test_serial_cells_fork_from_a_preloaded_server_and_match_a_plain_process(model_dir,
                                                                            tmp_path,
                                                                            monkeypatch):
    """Serial HF cells start from the fork server (no interpreter start, no imports); a cell
    run that way trains exactly as `offpolicy train` in a fresh process does."""
    import offpolicy.tools.ablate as ablate_module
    from offpolicy.tools.ablate_cells import ForkedCell, LocalCell

    forked = []
    monkeypatch.setattr(ablate_module, "ForkedCell",
                        lambda *a: forked.append(a[2].name) or ForkedCell(*a))
    spec = {"model": {"path": str(model_dir)}, "learner": {"steps": 4, "batch_groups": 2},
            "rollout": {"prompts_per_batch": 2, "group_size": 4}, "eval": {"every": 4},
            "env": {"eval_size": 8}, "staleness": {"mode": "lag"},
            "resources": {"serial": True},
            "ablate": {"grid": {"staleness.k": [2], "loss.name": ["tis"]},
                       "dir": str(tmp_path / "abl")}}
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    root = ablate(str(path), [], log=lambda *a: None)
    assert forked == ["k2_tis"]
    plain = LocalCell(root / "base.yaml", ["staleness.k=2", "loss.name=tis"],
                      tmp_path / "plain", dict(__import__("os").environ))
    plain.proc.wait(timeout=120)
    plain.close()
    losses = [[json.loads(x)["learner/loss"] for x in (d / "metrics.jsonl").open()]
              for d in (root / "k2_tis", tmp_path / "plain")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_a_stopped_forked_cell_exits_and_leaves_no_process(model_dir, tmp_path):
    import os
    import time

    from offpolicy.tools.ablate_cells import ForkedCell

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"path": str(model_dir)},
                                    "resources": {"serial": True},
                                    "learner": {"steps": 100000}}))
    cell = ForkedCell(base, [], tmp_path / "cell", dict(os.environ))
    log = tmp_path / "cell" / "train.log"
    deadline = time.time() + 120
    while "step" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.5)
    pid = cell.proc.pid
    assert os.getpgid(pid) == pid  # its own session: `stop` reaches what it started
    cell.stop()
    cell.close()
    assert cell.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_named_grids_and_tables_with_several_row_keys(tmp_path):
    """`ablate.grids` holds several named grids; a grid of three keys besides the seed gets
    rows for each pair of the first two (an empty value shown as `none`) and columns for the
    last; files per grid."""
    from offpolicy.tools.ablate_results import collect, write_results

    (tmp_path / "g.yaml").write_text(
        "ablate:\n  grids:\n    credit: {learner.credit: [broadcast, gigpo], "
        "env.curriculum.knob: ['', calls], env.kwargs.calls: [4], run.seed: [0, 1]}\n"
        "    other: {loss.name: [pg]}\n")
    _, spec = load_ablation(str(tmp_path / "g.yaml"))
    grid = spec["grids"]["credit"]
    assert set(spec["grids"]) == {"credit", "other"}
    cells = [dict(zip(grid, v)) for v in __import__("itertools").product(*grid.values())]
    assert cell_name(cells[0]) == "creditbroadcast_knobnone_calls4_seed0"
    for cell in cells:
        d = tmp_path / cell_name(cell)
        d.mkdir()
        final = 0.9 if cell["env.curriculum.knob"] else 0.1
        (d / "summary.json").write_text(json.dumps({
            "final_eval_reward": final, "base_eval_reward": 0.0, "samples": 200,
            "wall_s": 1.0, "staleness_mean": 1.0, "interrupted": False}))
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "learner/batch_size": 100, "eval/reward": r,
                        "is/ess_frac_q1": 0.9, "is/ess_frac_q4": 0.99,
                        "episode/versions_spanned_max": 7}) + "\n"
            for i, r in enumerate([0.0, final])))
    text = write_results(tmp_path, grid, collect(tmp_path, cells, 0.5), 0.5, "credit")
    assert text.startswith("## Grid `credit`")
    assert "| learner.credit, env.curriculum.knob | 4 |" in text
    assert "| gigpo, calls | 0.900 [0.900, 0.900] (n=2) ^ |" in text
    assert "| broadcast, none | not reached (0/2) |" in text
    assert "| gigpo, none | 0.900 -> 0.990; - -> -; - -> -; 7 |" in text
    assert (tmp_path / "results_credit.md").exists() and (tmp_path / "results_credit.csv").exists()
    (tmp_path / "g.yaml").write_text("ablate: {grids: {a: {loss.name: pg}}}\n")
    with pytest.raises(ConfigError, match="ablate.grids.a.loss.name: expected a non-empty list"):
        load_ablation(str(tmp_path / "g.yaml"))
