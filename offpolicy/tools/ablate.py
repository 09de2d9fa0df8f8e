"""`offpolicy ablate CONFIG`: one training run per cell of a grid (e.g. staleness.k x loss.name x
run.seed), run in parallel, resumable, then one table and two plots.

Reads: a config YAML whose `ablate:` section holds `grid` ({key: [values]}; or `grids`,
{name: {key: [values]}}, several grids whose cells run once each), `parallel` and
optionally `dir`, `threshold` (an eval reward: the table then also gives the samples each
cell needed to reach it), `base` (a config file, relative to this one, that the cells start
from) and `extra` ({"<grid key>=<value>": [overrides]}: settings for the cells with that
value); the rest of the file is the base config of every cell (over `base`'s, key by key).
Writes, in the ablation folder (default `ablations/<config stem>`): `base.yaml`, one normal run
folder per cell (with its `train.log`), `results.csv`, `results.md`, `reward_vs_samples.png`,
`final_vs_k.png` (with `grids`, each file per grid, `results_<name>.csv` and so on, and
`results.md` holding every grid's tables). A cell whose `summary.json` says it finished is
skipped on a rerun.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from offpolicy.core.errors import ConfigError
from offpolicy.runtime.placement import private_ray_auth
from offpolicy.runtime.validate import load_config
from offpolicy.tools.ablate_cells import (ClusterCell, ForkedCell, LocalCell, cell_resources,
                                          connect_cluster)
from offpolicy.tools.ablate_results import (cell_done, cell_name, collect, run_summary,
                                            write_results)


def load_ablation(path: str) -> tuple[dict, dict]:
    """(base config dict, ablate section) from the YAML; one-line ConfigError on bad input."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    spec = data.pop("ablate", None)
    if not isinstance(spec, dict) or not (isinstance(spec.get("grid"), dict) and spec["grid"]
                                          or isinstance(spec.get("grids"), dict) and spec["grids"]):
        raise ConfigError(f"{path}: needs an `ablate:` section with `grid: {{key: [values]}}` "
                          "(or `grids: {name: {key: [values]}}`)")
    unknown = set(spec) - {"grid", "grids", "parallel", "dir", "threshold", "base", "extra"}
    if unknown:
        raise ConfigError(f"ablate: unknown keys {sorted(unknown)}; "
                          "valid: grid, grids, parallel, dir, threshold, base, extra")
    # One grid, or several named ones (their cells run once each, tables per grid)
    spec["grids"] = spec.get("grids") or {"": spec["grid"]}
    keys = {k for grid in spec["grids"].values() if isinstance(grid, dict) for k in grid}
    for when, sets in (spec.get("extra") or {}).items():
        key, _, value = str(when).partition("=")
        if key not in keys or not isinstance(sets, list):
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
    for name, grid in spec["grids"].items():
        where = f"ablate.grids.{name}" if name else "ablate.grid"
        if not isinstance(grid, dict) or not grid:
            raise ConfigError(f"{where}: expected {{key: [values]}}")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{key}: expected a non-empty list")
    return data, spec


def _merged(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys set on it, nested sections merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = (_merged(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def ablate(path: str, overrides: list[str], log=print) -> Path:
    base, spec = load_ablation(path)
    stem = Path(path).stem
    root = Path(spec.get("dir") or Path("ablations") / stem)
    root.mkdir(parents=True, exist_ok=True)
    base.setdefault("run", {})["name"] = root.name  # two files sharing a folder share cells
    base_path = root / "base.yaml"
    base_path.write_text(yaml.safe_dump(base, sort_keys=False))
    by_grid = {name: [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
               for name, grid in spec["grids"].items()}
    cells = list({cell_name(c): c for cs in by_grid.values() for c in cs}.values())
    steps, configs, use_ray = {}, {}, False
    for cell in cells:  # every cell's config is checked before anything runs
        cfg = configs[cell_name(cell)] = load_config(base_path,
                                                     cell_overrides(cell, spec, overrides))
        steps[cell_name(cell)] = cfg.learner.steps
        use_ray |= not cfg.resources.serial
    todo = [c for c in cells if not cell_done(root / cell_name(c))]
    parallel = max(1, int(spec.get("parallel", 1)))
    address = cfg.cluster.address
    log(f"ablation {root}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
        f"{len(todo)} to run, {parallel} at a time"
        + (f", on the Ray cluster at {address}" if address else ""))
    launcher = _launcher(root, base_path, lambda c: cell_overrides(c, spec, overrides),
                         configs, address, use_ray and bool(todo))
    failed = _run_cells(todo, parallel, steps, launcher, root, log)
    sections = []
    for name, grid in spec["grids"].items():
        rows = collect(root, by_grid[name], spec.get("threshold"))
        sections.append(write_results(root, grid, rows, spec.get("threshold"), name))
    if len(sections) > 1:  # one page for every grid's tables
        (root / "results.md").write_text("\n".join(sections))
    log(f"results: {root / 'results.md'}, results*.csv and plots in {root}")
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


def _launcher(root: Path, base_path: Path, overrides, configs: dict, address: str,
              start_ray: bool):
    """cell -> a started cell handle (ablate_cells.py): a Ray task on the cluster at
    `cluster.address`, else a local process. Local cells with Ray roles share one private Ray
    instance (each cell's run connects as its own job): its daemons start once, not once per
    cell. Serial cells need none, and no Ray is imported for them; those with the HF engine
    fork from a server that has imported everything once (`ForkedCell`)."""
    if address:
        connect_cluster(address)
        return lambda cell: ClusterCell(base_path, overrides(cell), root / cell_name(cell),
                                        cell_resources(configs[cell_name(cell)]))
    env = dict(os.environ)
    if start_ray:
        import ray

        private_ray_auth()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                 configure_logging=True)
        # Copied after ray.init: Ray sets RAY_AUTH_MODE=token in this process when it turns
        # on token auth, and cells without it cannot join ("InvalidAuthToken").
        env = dict(os.environ)
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    def local(cell):
        cfg = configs[cell_name(cell)]
        kind = ForkedCell if cfg.resources.serial and cfg.engine.name == "hf" else LocalCell
        return kind(base_path, overrides(cell), root / cell_name(cell), env)
    return local


def _run_cells(todo: list[dict], parallel: int, steps: dict[str, int], launch, root: Path,
               log) -> list[str]:
    """Run each cell through `launch`, `parallel` at a time; progress every 10 s. Returns the
    names of the cells that failed."""
    pending, running, failed = list(todo), {}, []
    start, last, finished = time.time(), 0.0, 0
    restore = signal.signal(signal.SIGTERM, _raise_interrupt)  # stops the cells like Ctrl-C
    try:
        while pending or running:
            while pending and len(running) < parallel:
                cell = pending.pop(0)
                running[cell_name(cell)] = launch(cell)
            for name, handle in list(running.items()):
                code = handle.poll()
                if code is not None:
                    handle.close()
                    del running[name]
                    finished += 1
                    ok = code == 0 and cell_done(root / name)
                    failed += [] if ok else [name]
                    log(f"[{finished}/{len(todo)}] {name}: " + _outcome(root / name, ok, code))
            if time.time() - last >= 10 and running:
                last = time.time()
                log(_progress(running, finished, len(todo), steps, last - start, root))
            time.sleep(0.5)
    except KeyboardInterrupt:
        # SIGTERM, not SIGINT: a process started in the background ignores SIGINT, and each
        # run stops its own Ray roles on either.
        for handle in running.values():
            handle.stop()
        for handle in running.values():
            handle.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, restore)
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
    return failed


def _outcome(run_dir: Path, ok: bool, code: int) -> str:
    s = run_summary(run_dir)
    if not ok:
        return f"FAILED (exit {code})"
    return (f"eval {s.get('base_eval_reward') or 0:.3f} -> {s['final_eval_reward']:.3f} "
            f"in {s.get('wall_s', 0):.0f}s")


def _progress(running: dict, finished: int, total: int, steps: dict[str, int],
              elapsed: float, root: Path) -> str:
    """One progress line: cells done, each running cell's step (0 for a cell on the cluster
    until it returns), time and an estimate."""
    now = {n: _steps(root / n) for n in running}
    # cells' worth of work done so far, running cells counted by their steps
    done = finished + sum(now[n] / steps[n] for n in now)
    eta = elapsed / done * (total - done) if done > 0.2 else None
    return (f"  {finished}/{total} done, running: "
            + ", ".join(f"{n} step {k}" for n, k in now.items())
            + f"; {elapsed / 60:.1f} min" + (f", about {eta / 60:.0f} min left" if eta else ""))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _steps(run_dir: Path) -> int:
    try:
        with open(run_dir / "metrics.jsonl") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0
