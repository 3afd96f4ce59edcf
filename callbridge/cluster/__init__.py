"""Admission and the call directory: one instance in memory, or many sharing Redis.

:func:`build_admission` picks the implementation from ``[cluster]``: embedded without
``cluster.redis_url`` (today's behaviour), :class:`RedisAdmission` with it. Both have the same
methods (:class:`Admission`), which every carrier's admission goes through."""

from __future__ import annotations

from collections.abc import Callable

from ..config import Settings
from ..tts import TtsWorker
from .admission import Admission, ClusterUnavailable, Instance, Placement, Refused, Ticket


def build_admission(settings: Settings, worker: Callable[[], TtsWorker | None], ready: Callable[[], bool],
                    expire: Callable[[], None] = lambda: None) -> Admission:
    if not settings.cluster.enabled:
        return Admission(settings, worker, ready, expire)
    from .redis_admission import RedisAdmission  # the redis package is needed only then

    return RedisAdmission(settings, worker, ready, expire)


__all__ = ["Admission", "ClusterUnavailable", "Instance", "Placement", "Refused", "Ticket", "build_admission"]
