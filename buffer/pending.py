"""The closed segments of episodes still being generated, held until their episode ends.

Reads: packed segments (`Segments`, one per episode and send) from the rollout actors, through
`ReplayBuffer.add_segments`. Writes: an episode's earlier segments when its group arrives
(`pop`), counts of the rows dropped when it never will (`drop`).

A long episode sends its segments as they close, so the actor's memory does not grow with the
episode; they wait here, counted in rows (admission's backlog in row mode) and bytes (the
buffer's byte capacity). Each episode's segments are also kept under the incarnation that sent
them: when an actor dies, its episodes will never end and their segments are dropped with it,
counted. Not thread-safe on its own: the buffer calls it under its lock.
"""

from __future__ import annotations

from offpolicy.core.types import Incarnation, Segments

JOIN = 32
"""An episode's held chunks (one per send, about a second of generation) are joined in runs of
this many: an episode of a million tokens is then some forty arrays of half a megabyte, not
thousands of small objects that fragment the buffer's memory."""


class PendingSegments:
    def __init__(self):
        self.by_episode: dict[str, list[Segments]] = {}
        self.of: dict[Incarnation, set[str]] = {}  # the episodes each incarnation sent
        self.loose: dict[str, int] = {}  # chunks at the end of each episode's not yet joined
        self.rows = self.nbytes = 0

    def __contains__(self, episode: str) -> bool:
        return episode in self.by_episode

    def add(self, chunks: list[Segments], actor: Incarnation | None = None) -> None:
        """Hold these chunks; every `JOIN` new chunks of an episode are joined into one."""
        mine = self.of.setdefault(actor, set()) if actor is not None else set()
        for c in chunks:
            held = self.by_episode.setdefault(c.episode_id, [])
            held.append(c)
            self.nbytes += c.nbytes
            self.rows += len(c)
            mine.add(c.episode_id)
            loose = self.loose[c.episode_id] = self.loose.get(c.episode_id, 0) + 1
            if loose >= JOIN:  # the last JOIN chunks as one
                joined = Segments.joined(held[-JOIN:])
                self.nbytes += joined.nbytes - sum(x.nbytes for x in held[-JOIN:])
                held[-JOIN:] = [joined]
                self.loose[c.episode_id] = 0

    def pop(self, episode: str, actor: Incarnation | None = None) -> list[Segments]:
        """An episode's segments, in order, no longer held (its group arrived)."""
        chunks = self.by_episode.pop(episode, [])
        self.loose.pop(episode, None)
        self.nbytes -= sum(c.nbytes for c in chunks)
        self.rows -= sum(len(c) for c in chunks)
        if actor is not None and actor in self.of:
            self.of[actor].discard(episode)
        return chunks

    def drop(self, episodes) -> int:
        """Drop these episodes' segments (they will never join a group); returns the rows."""
        return sum(len(c) for ep in episodes for c in self.pop(ep))

    def drop_actor(self, actor: Incarnation) -> int:
        """Drop every segment `actor` sent of an episode still in flight (the actor is gone)."""
        return self.drop(self.of.pop(actor, set()))

    # -- resume -----------------------------------------------------------------------------------

    def forget_senders(self) -> None:
        """After a restore: the incarnations that sent the segments are gone; the resumed
        actors claim their episodes' segments (`claim`) before `keep_claimed`."""
        self.of.clear()

    def claim(self, actor: Incarnation, episodes) -> None:
        self.of.setdefault(actor, set()).update(episodes)

    def keep_claimed(self) -> int:
        """Drop the segments of episodes no resumed actor claimed; returns the rows dropped."""
        claimed = set().union(*self.of.values())
        return self.drop([ep for ep in self.by_episode if ep not in claimed])
