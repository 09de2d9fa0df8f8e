"""offpolicy: asynchronous off-policy RL for language models.

Rollout actors generate with whatever weights they hold and push version-tagged trajectories
into a replay buffer; a learner samples, corrects for staleness with importance weights,
updates and publishes weights back. See README.md to start and docs/architecture.md for how
the parts fit together.
"""

import os

# Nothing is downloaded from a model hub at run time; models are built locally or loaded from
# a path. Quiet the per-file progress bars of transformers as well.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__version__ = "0.1.0"
