"""Ray proxies: call a role in another process as if it were a local object.

Reads/writes: nothing of its own; every call is a Ray call to the role's actor.
`Remote` wraps a Ray actor handle (or an `ActorRef`) so that role classes written for local
objects (the buffer, the weight store) run unchanged across processes; `ActorRef` finds an
actor by name where it is used. Only the wiring (`ray_roles.py`) creates them.
"""

from __future__ import annotations


class Remote:
    """Call a Ray actor like a local object: `proxy.m(*a)` is `ray.get(handle.m.remote(*a))`.

    Methods named in `fire_and_forget` return at once; the previous such call is awaited first,
    which bounds the calls in flight to one and surfaces a failure on the next call.
    """

    def __init__(self, handle, fire_and_forget: tuple[str, ...] = ()):
        self._handle, self._ff, self._pending = handle, fire_and_forget, None

    def settle(self) -> None:
        """Wait for the fire-and-forget call in flight, if any (it may raise here)."""
        if self._pending is not None:
            import ray

            pending, self._pending = self._pending, None
            ray.get(pending)

    def __getattr__(self, name: str):
        import ray

        method = getattr(self._handle, name)
        if name in self._ff:
            def call(*args, **kwargs):
                if self._pending is not None:
                    ray.get(self._pending)
                self._pending = method.remote(*args, **kwargs)
            return call
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))

    def __getstate__(self):
        return {"_handle": self._handle, "_ff": self._ff, "_pending": None}

    def __setstate__(self, state):
        self.__dict__.update(state)


class ActorRef:
    """A Ray actor found by its name: it pickles as the name and looks the handle up where it
    is used. Roles get the buffer and weight store this way, so no actor handle rides in a
    restartable actor's constructor arguments (Ray cannot promise those survive a restart,
    and logs an error for every such actor)."""

    def __init__(self, name: str):
        import ray

        self.name, self._handle = name, None
        self.namespace = ray.get_runtime_context().namespace  # the driver's: actors differ

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return getattr(self._handle, attr)

    def __getstate__(self):
        return {"name": self.name, "namespace": self.namespace, "_handle": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
