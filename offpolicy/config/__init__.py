"""The config layer: the run configuration's schema, its loading, and the run plan.

`schema.py` and `placement.py` (the dataclasses, a docstring per field), `io.py` (YAML and
`key=value` overrides into a `Config`, the config reference), `plan.py` (the decisions a
config makes for a run, resolved once). Imports only `offpolicy.core`; validation against the
registries is `offpolicy/runtime/validate.py`.
"""
