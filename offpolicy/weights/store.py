"""The weight store: the newest published weight payloads by version (a small Ray actor).

Reads: `put(version, payload)` from the learner's WeightSync. Writes: payloads to actors'
`pick`. A payload is a list holding a Ray object reference (object store), a folder path
(filesystem) or a state dict (in-process); the store never looks inside, so this module does
not import torch and the actor starts in a fraction of a second.
"""

from __future__ import annotations


class WeightStore:
    """The newest `keep` published versions' payloads (a Ray actor in runs). Lag mode keeps
    k + 2 versions so actors can generate with the exact (older) version asked of them."""

    def __init__(self, keep: int = 1) -> None:
        self.keep, self.payloads = keep, {}  # version -> list (a Ray ref stays unresolved in it)

    def put(self, version: int, payload: list) -> None:
        self.payloads[version] = payload
        for v in sorted(self.payloads)[:-self.keep]:
            del self.payloads[v]

    def latest(self) -> tuple[int, list]:
        if not self.payloads:
            return -1, []
        v = max(self.payloads)
        return v, self.payloads[v]

    def get(self, version: int) -> list | None:
        return self.payloads.get(version)

    def pick(self, have_version: int, want: int | None) -> tuple[int, list] | None:
        """`fetch`'s rule: the newest if newer than `have_version`, else version `want`."""
        if want is None:
            version, payload = self.latest()
            return (version, payload) if version > have_version else None
        if want == have_version:
            return None
        payload = self.get(want)
        if payload is None:
            raise RuntimeError(f"weights: version {want} is no longer kept (have "
                               f"{sorted(self.payloads)[:1]}...); raise the store's keep")
        return want, payload
