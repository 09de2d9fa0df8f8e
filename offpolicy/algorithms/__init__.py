"""The algorithms layer: pure functions of tensors and arrays, no processes.

`losses.py` (the policy losses and their specs, the KL and entropy terms, the `is/`
diagnostics), `advantages.py` (estimators over GRPO groups), `logprobs.py` (scoring tokens
with a model). Imports `offpolicy.core` and `offpolicy.config` only.
"""
