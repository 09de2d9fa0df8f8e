"""What the buffer measures of the episodes that pass through it: the `episode/` metrics of
each batch and the share of each episode's policy tokens that got trained.

Reads: arriving groups (`arrived`) and the rows of each batch (`trained`). Writes: the
`episode/` metrics (`metrics`) and, for the ledger, the trained share by episode length
(`trained_share`). Not thread-safe on its own: the buffer calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from offpolicy.buffer.store import Group, episode_summary, episodes_of

TRACKED_EPISODES = 20_000
"""Episodes whose generated and trained tokens are kept (the newest)."""


class EpisodeStats:
    def __init__(self):
        self.window: list[tuple] = []  # episodes arrived since the last batch
        # the newest episodes' policy tokens: [generated, trained] (the length-bias check)
        self.tokens: OrderedDict[str, list[int]] = OrderedDict()

    def arrived(self, group: Group) -> None:
        """Each arriving episode's tokens, policy tokens, segments, versions spanned and wall
        time, for the next batch's metrics."""
        for episode, items in episodes_of(group).items():
            summary = episode_summary(items)
            self.tokens[episode] = [summary[1], 0]
            if len(self.tokens) > TRACKED_EPISODES:
                self.tokens.popitem(last=False)
            self.window.append(summary)

    def trained(self, rows) -> None:
        """These rows were handed to the learner."""
        for t in rows:
            if (tokens := self.tokens.get(t.episode)) is not None:
                tokens[1] += t.policy_tokens()

    def metrics(self) -> dict:
        """`episode/` metrics of the episodes arrived since the last call (and clears them)."""
        window, self.window = self.window, []
        if not window:
            return {}
        tokens, policy, segments, spanned, wall = (np.array(x, dtype=np.float64)
                                                   for x in zip(*window))
        bins, counts = np.unique(2 ** np.floor(np.log2(segments)).astype(np.int64),
                                 return_counts=True)  # segments per episode, powers of 2
        return {"episode/count": len(window), "episode/tokens_mean": tokens.mean(),
                "episode/segments_hist": {str(b): int(n) for b, n in zip(bins, counts)},
                "episode/tokens_max": tokens.max(), "episode/policy_tokens_mean": policy.mean(),
                "episode/segments_mean": segments.mean(), "episode/segments_max": segments.max(),
                "episode/versions_spanned_mean": spanned.mean(),
                "episode/versions_spanned_max": spanned.max(), "episode/wall_s_mean": wall.mean()}

    def trained_share(self, stored: set[str]) -> dict:
        """The share of generated policy tokens that were trained, for each quarter of the
        tracked episodes by length (shortest first), leaving out the episodes with rows still
        `stored`: long episodes must not be the ones dropped."""
        done = sorted(v for k, v in self.tokens.items() if k not in stored)
        if len(done) < 4:
            return {}
        quarters = np.array_split(np.array(done, dtype=np.float64), 4)
        return {"trained_share_by_length": [round(q[:, 1].sum() / max(q[:, 0].sum(), 1), 4)
                                            for q in quarters],
                "length_quartile_tokens": [int(q[-1, 0]) for q in quarters]}
