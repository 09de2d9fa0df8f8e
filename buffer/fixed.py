"""A stand-in for the replay buffer that serves the same batch at every step.

Reads: the Batch it was given. Writes: nothing. For learner tests and benchmarks that measure
the update alone: `sample` returns the batch (None on data-parallel ranks other than 0, which
get it from rank 0), `publish` does nothing.
"""

from __future__ import annotations


class FixedBatch:
    def __init__(self, batch):
        self.batch = batch

    def sample(self, version):
        return self.batch

    def publish(self, version):
        pass

    def is_closed(self):
        return False
