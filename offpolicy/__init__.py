"""offpolicy: asynchronous off-policy RL for language models.

Rollout actors generate with whatever weights they hold and push version-tagged trajectories
into a replay buffer; a learner samples, corrects for staleness with importance weights,
updates and publishes weights back. See README.md to start and docs/architecture.md for how
the parts fit together, layer by layer. Importing the package changes nothing in the process:
a process that hosts a role sets itself up with `offpolicy.core.machine.setup_process`.
"""

import time as _time

__version__ = "0.1.0"
IMPORTED_AT = _time.time()  # for the start-up breakdown (`core.machine.process_started_at`)
