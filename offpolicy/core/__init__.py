"""The foundation layer: what every other layer shares and nothing of theirs.

`types.py` (Trajectory, Batch, PaddedBatch, Incarnation: numpy only, cheap to pickle),
`errors.py` (ConfigError), `registry.py` (the name -> object registries a config chooses
from) and `machine.py` (the process's settings and what it runs on). Imports no other layer.
"""
