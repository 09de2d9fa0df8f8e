"""The replay buffer role (`offpolicy.buffer`).

`replay.py` (`ReplayBuffer` and `Admission`), `store.py` (the `Store` protocol), `bound.py`
and `lag.py` (the two stores), `ledger.py` (where every episode went), `samplers.py` (which
groups a batch takes), `fixed.py` (the same batch every step, for learner tests). A role
package: it imports the core, config and algorithms layers, never torch, and neither of the
other roles.
"""
