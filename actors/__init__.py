"""The rollout role: engines and the rollout actor (`offpolicy.actors`).

`engine.py` (the `Engine` protocol and the `ENGINES` registry), `hf.py`, `vllm.py`, `fake.py`
(the engines; importing this package registers all three), `rollout.py` (`RolloutActor`).
A role package: it imports the core, config, algorithms, envs, models and weights layers, and
neither of the other roles (`offpolicy.buffer`, `offpolicy.learner`).
"""

from offpolicy.actors import fake, hf, vllm  # noqa: F401  (each registers its engine)
