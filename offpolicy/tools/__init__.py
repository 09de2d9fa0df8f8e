"""The tools layer: the command line and what it runs around single runs.

`cli.py` (`offpolicy ...`), `train_command.py` (`offpolicy train`: exit codes and the last
line; what an ablation cell runs too), `ablate.py`, `ablate_cells.py` and `ablate_results.py`
(`offpolicy ablate`: a grid of runs, then tables and plots), `report.py` (`offpolicy report`).
The top layer: nothing in the package imports it.
"""
