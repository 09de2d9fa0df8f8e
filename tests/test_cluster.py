"""A real two-node Ray cluster started from the command line, and a run sent by `ray job submit`.

What a user does on a cluster, on this one machine: `ray start --head` and `ray start --address`
(both nodes on 127.0.0.1, each with its own CPUs and one `learner_slot`), then
`ray job submit --working-dir . -- offpolicy train CONFIG`, then `ray stop`. The resources
force the layout: each node fits exactly one learner worker (0.5 CPU + its slot) and one actor
(1.5 CPU), so the data-parallel workers meet across nodes and the actors run on both.
"""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_ray_loop import QUICKSTART, ROOT, ray_processes

BIN = Path(sys.executable).parent  # the `ray` and `offpolicy` commands of this environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture
def cluster():
    """Two Ray nodes started by the CLI with token authentication; stopped with `ray stop`."""
    # `ray stop` stops every Ray process on the machine, so refuse to run beside another Ray
    # (an earlier test's private Ray may still be exiting: give it time).
    _wait_no_ray(30)
    assert not ray_processes(), "another Ray is running on this machine; `ray stop` would end it"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    node = ["--node-ip-address=127.0.0.1", "--num-cpus=2", '--resources={"learner_slot": 1}',
            "--disable-usage-stats"]
    t0 = time.monotonic()
    try:
        head = _ray("start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", *node, env=env)
        assert head.returncode == 0, head.stderr[-2000:]
        second = _ray("start", f"--address=127.0.0.1:{gcs}", *node, env=env)
        assert second.returncode == 0, second.stderr[-2000:]
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dashboard}", "dashboard_port": dashboard,
               "address": f"127.0.0.1:{gcs}", "start_s": time.monotonic() - t0}
    finally:
        stop = _ray("stop", env=env)
        _wait_no_ray(30)  # Ray's processes exit asynchronously
        left = ray_processes()
        if left:  # never leave a cluster behind, even when the test failed
            _ray("stop", "--force", env=env)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert not left, f"`ray stop` left Ray processes {sorted(left)}"


def _wait_no_ray(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)


def _listeners(port: int) -> set[str]:
    """Local addresses listening on TCP `port` (from /proc/net/tcp, LISTEN state)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(host)[::-1]))
    return found


@pytest.mark.ray
def test_ray_job_submit_runs_on_two_nodes(cluster, base_model, tmp_path):
    # the job's working directory is a temporary copy: the run folder goes to ~/runs instead
    env, run_dir = cluster["env"], tmp_path / "runs" / "on_two_nodes"
    # the dashboard, and with it the job server, listens on loopback only
    assert _listeners(cluster["dashboard_port"]) == {"127.0.0.1"}
    steps = 20
    t0 = time.monotonic()
    job = _ray("job", "submit", f"--address={cluster['dashboard']}", "--working-dir=.",
               f"--runtime-env-json={json.dumps({'env_vars': {'HOME': str(tmp_path)}})}", "--",
               "offpolicy", "train", str(QUICKSTART.relative_to(ROOT)), f"model.path={base_model}",
               "run.name=on_two_nodes", f"learner.steps={steps}", "eval.every=10",
               "learner.batch_groups=8", "rollout.prompts_per_batch=8", "rollout.num_actors=2",
               "resources.learner_workers=2", "resources.learner_cpus=0.5",
               "resources.learner_resources={learner_slot: 1}", "resources.actor_cpus=1.5",
               "cluster.placement=spread", env=env, timeout=600)
    job_s = time.monotonic() - t0
    assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, \
        (job.stdout + job.stderr)[-4000:]

    # the run folder is complete
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").is_file()
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and not summary["interrupted"]
    assert summary["cluster"] not in ("", "local")  # it joined the job's cluster

    # where the processes ran: one learner worker and one actor on each node
    where = summary["placement"]
    nodes = set(where["learners"]) | set(where["actors"])
    assert len(nodes) == 2, where
    assert set(where["learners"]) == nodes and set(where["actors"]) == nodes
    assert where["buffer"] == where["store"] == where["driver"]  # the driver's node
    print(f"\ncluster start {cluster['start_s']:.1f} s, ray job submit of {steps} steps "
          f"{job_s:.1f} s (training {summary['train_s']:.1f} s); placement {where}")


@pytest.mark.ray
def test_ablate_places_serial_cells_on_the_cluster_by_their_resources(cluster, base_model,
                                                                      tmp_path):
    """With cluster.address set each cell is a Ray task asking for the cell's resources: one
    `learner_slot` per node makes the two cells run one on each node, and their files come
    back to the ablation folder here."""
    (tmp_path / "grid.yaml").write_text(
        f"model: {{path: {base_model}}}\nenv: {{name: addition, eval_size: 16}}\n"
        "learner: {steps: 4, batch_groups: 2}\neval: {every: 2}\n"
        "rollout: {group_size: 4, prompts_per_batch: 2}\n"
        "resources: {serial: true, learner_resources: {learner_slot: 1}}\n"
        f"cluster: {{address: '{cluster['address']}'}}\n"
        f"ablate: {{grid: {{run.seed: [0, 1]}}, parallel: 2, dir: {tmp_path / 'abl'}}}\n")
    out = subprocess.run([str(BIN / "offpolicy"), "ablate", str(tmp_path / "grid.yaml")],
                         env=cluster["env"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "on the Ray cluster at" in out.stdout
    nodes = set()
    for seed in (0, 1):
        cell = tmp_path / "abl" / f"seed{seed}"
        summary = json.loads((cell / "summary.json").read_text())
        assert summary["steps"] == 4 and not summary["interrupted"]
        assert (cell / "metrics.jsonl").is_file()
        last = (cell / "train.log").read_text().strip().splitlines()[-1]
        assert last.startswith("(ran on Ray node ")
        nodes.add(last)
    assert len(nodes) == 2  # one learner_slot per node: the cells could not share one
    assert "2 runs: final eval" in (tmp_path / "abl" / "results.md").read_text()


@pytest.mark.ray
def test_private_ray_dashboard_on_loopback_and_placement_timeout(monkeypatch):
    """A private Ray's dashboard binds to 127.0.0.1; a placement group the cluster cannot
    grant ends the run after cluster.placement_timeout_s with one line naming the request."""
    import ray

    from offpolicy.core.errors import ConfigError
    from offpolicy.runtime.validate import load_config
    from offpolicy.runtime.placement import reserve, start_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _free_port()
    cfg = load_config(None, ["cluster.dashboard=true", f"cluster.dashboard_port={port}",
                             "resources.num_cpus=2", "resources.learner_cpus=0.5",
                             "resources.actor_cpus=0.5", "cluster.placement_timeout_s=1"])
    assert start_ray(cfg) == "local"
    try:
        deadline = time.monotonic() + 30  # the dashboard starts after ray.init returns
        while not _listeners(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _listeners(port) == {"127.0.0.1"}
        cfg.resources.actor_resources = {"gpu_node": 1}  # no node has one
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=r"cluster.placement: the cluster did not grant "
                                              r"1 CPU, 1 gpu_node \(pack\) within 1 s"):
            reserve(cfg, ray, log=lambda *a: None)
        assert time.monotonic() - t0 < 10
        assert ray.available_resources().get("CPU") == 2  # the refused group was removed
    finally:
        ray.shutdown()


def test_unreachable_cluster_address_is_a_one_line_error():
    from offpolicy.core.errors import ConfigError
    from offpolicy.runtime.validate import load_config
    from offpolicy.runtime.placement import start_ray

    cfg = load_config(None, [f"cluster.address=127.0.0.1:{_free_port()}"])  # nothing listens
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"cluster.address: cannot reach a Ray cluster at "
                                          r"127.0.0.1:\d+ \(Connection refused\)"):
        start_ray(cfg)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConfigError, match="cluster.address: expected '', 'auto' or HOST:PORT"):
        load_config(None, ["cluster.address=my-head-node"])
    with pytest.raises(ConfigError, match="resources.learner_workers: must be > 0"):
        load_config(None, ["resources.learner_workers=0"])
    with pytest.raises(ConfigError, match="resources.actor_resources: expected a mapping"):
        load_config(None, ["resources.actor_resources={gpu_node: yes}"])


def test_cluster_yaml_passes_rays_schema_and_keeps_the_dashboard_private():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` checks first
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for start in (head, " ".join(config["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token" in start and "RAY_worker_niceness=0" in start
    assert all((ROOT / src).exists() for src in config["file_mounts"].values()
               if src.startswith("./"))


def test_docker_images_copy_what_exists_and_install_real_extras():
    import re
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (ROOT / "docker" / name).read_text()
        copied = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
        assert {"offpolicy", "actors", "learner", "buffer", "pyproject.toml"} <= set(copied)
        assert all((ROOT / src).exists() for src in copied), name
        installed = re.findall(r'"\.\[([\w,-]+)\]"', text)
        assert installed and all(e in extras for group in installed for e in group.split(","))
