"""The states of a batch and of each of its requests, with their transitions in one table each.

A request (an *item*)::

    pending_local ──(answered, or a final error)──────────────────────► done | failed
      │  ▲                                                                 ▲
      │  └──(policy now local_only)──┐                                     │
      └──(needs the cloud)──► waiting_cloud ──(the cloud answered)─────────┘

``pending_local`` has not been tried yet: it runs locally when the device is idle, unless the
router policy sends it to the cloud (``cloud_only``, ``cloud_first``). ``waiting_cloud`` only
the cloud can serve (a model only the cloud has, a prompt too long here, ``cloud_only``): it
waits, across restarts, until the cloud answers. ``done`` and ``failed`` are final and hold the
request's one result line. Cancelling or expiring a batch fails its unfinished items.

A batch (OpenAI's statuses; validation happens before a batch exists, so a bad input file is a
400 and no batch is ever ``validating`` or ``failed`` here)::

    in_progress ──► finalizing ──► completed
         ├────────► cancelling ──► cancelled
         └────────► expired            (its completion window passed)
"""

from __future__ import annotations

from enum import StrEnum

from shared.batch_api import BatchStatus


class ItemState(StrEnum):
    PENDING_LOCAL = "pending_local"
    WAITING_CLOUD = "waiting_cloud"
    DONE = "done"
    FAILED = "failed"


ITEM_TRANSITIONS: dict[ItemState, frozenset[ItemState]] = {
    ItemState.PENDING_LOCAL: frozenset({ItemState.WAITING_CLOUD, ItemState.DONE, ItemState.FAILED}),
    ItemState.WAITING_CLOUD: frozenset({ItemState.PENDING_LOCAL, ItemState.DONE, ItemState.FAILED}),
    ItemState.DONE: frozenset(),
    ItemState.FAILED: frozenset(),
}
UNFINISHED: tuple[ItemState, ...] = (ItemState.PENDING_LOCAL, ItemState.WAITING_CLOUD)
FINISHED: tuple[ItemState, ...] = (ItemState.DONE, ItemState.FAILED)

BATCH_TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    "validating": frozenset({"in_progress", "failed"}),
    "in_progress": frozenset({"finalizing", "cancelling", "expired"}),
    "finalizing": frozenset({"completed"}),
    "cancelling": frozenset({"cancelled"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "expired": frozenset(),
    "cancelled": frozenset(),
}
# Statuses a batch ends in: its result files exist, its items are all final.
BATCH_FINAL: frozenset[BatchStatus] = frozenset({"completed", "failed", "expired", "cancelled"})


def item_may_move(old: ItemState, new: ItemState) -> bool:
    return new in ITEM_TRANSITIONS[old]


def batch_may_move(old: BatchStatus, new: BatchStatus) -> bool:
    return new in BATCH_TRANSITIONS[old]
