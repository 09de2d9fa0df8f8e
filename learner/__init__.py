"""The learner role (`offpolicy.learner`).

`learner.py` (`Learner`: the algorithm of one update), `parallel.py` (how the workers share it:
alone, data-parallel, FSDP), `sharding.py` (FSDP2), `workers.py` (data-parallel worker
processes), `parity.py` (the engine/learner log-prob check), `shared_prompt.py` (scoring with
each distinct prompt run once), `step_metrics.py` (timing spans, tensors as numbers). A role
package: it imports the core, config, algorithms, models and weights layers, and neither of
the other roles.
"""
