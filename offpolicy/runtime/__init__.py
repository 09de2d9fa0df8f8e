"""The runtime layer: one run, wired together. Everything that starts processes or writes a
run folder.

`launch.py` (`offpolicy train`'s driver), `layout.py` (the `Layout` protocol the driver drives),
`serial_roles.py` and `ray_roles.py` (the two layouts), `placement.py` and `remote.py` (Ray:
which cluster, which nodes and cores; proxies), `desk.py` (evals and checkpoint holds asked of the rollout actors),
`validate.py` (a config checked against the registries: `load_config`), `preflight.py` (checks
that need the model's files), `run_dir.py`, `checkpoint.py`, `metrics.py` (the run folder).
Imports every layer below it; the tools layer (`offpolicy.tools`) imports it.
"""
