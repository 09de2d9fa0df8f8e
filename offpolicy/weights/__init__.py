"""The weights layer: how the learner's weights reach the rollout actors.

`sync.py` (the `WeightSync` protocol, its implementations and the `WEIGHT_SYNCS` registry),
`store.py` (the weight store: the newest published versions, by version; no torch). Imports
the core and config layers.
"""
