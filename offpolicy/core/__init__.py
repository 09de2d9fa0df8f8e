"""The foundation layer: what every other layer shares and nothing of theirs.

`types.py` (Trajectory, Batch, PaddedBatch, Incarnation: numpy only, cheap to pickle),
`errors.py` (ConfigError), `registry.py` (the name -> object registries a config chooses
from), `process.py` (the settings each process makes once) and `machine.py` (what it runs on).
Imports no other layer.
"""
