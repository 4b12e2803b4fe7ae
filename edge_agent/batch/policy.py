"""Where a batch request goes, by the pushed router policy: the decisions, free of I/O.

==============  =======================================================================================
policy          a pending request
==============  =======================================================================================
local_first     local when the device is idle; the cloud takes what the local side refuses with an
                error the cloud may serve instead (``routing.router.falls_back``: a model only the
                cloud has, a prompt too long here, a local 5xx), and, while no model is active here,
                pending requests too (they stay pending if the cloud is unavailable)
local_only      local, never the cloud (requests waiting for the cloud come back to pending_local)
cloud_first     the cloud; local while the cloud is unavailable (the gate is backing off)
cloud_only      the cloud, never local; while it is unavailable the request waits for it
==============  =======================================================================================

Unlike an interactive request, a batch request is never answered "unavailable": it waits. A local
refusal that only says "not now" (queue full, no model yet) leaves it pending for a later try.
"""

from __future__ import annotations

from enum import StrEnum

from edge_agent.routing.router import falls_back
from shared.edge_config import RouterPolicy
from shared.errors import ModelNotReady, QueueFull, RequestError

# Local refusals that say "not now" rather than "not here".
_TRANSIENT = (QueueFull, ModelNotReady)


class Lane(StrEnum):
    LOCAL = "local"
    CLOUD = "cloud"


class Verdict(StrEnum):
    RETRY = "retry"  # stays pending_local: try again later
    CLOUD = "cloud"  # to waiting_cloud: only the cloud can serve it
    FAIL = "fail"  # a final error: its line goes to the error file


def lane_for_pending(
    policy: RouterPolicy, *, local_model: bool, cloud_configured: bool, cloud_failing: bool
) -> Lane | None:
    """Which lane may take pending_local requests now (None: neither; they wait)."""
    if policy is RouterPolicy.LOCAL_ONLY:
        return Lane.LOCAL if local_model else None
    if policy is RouterPolicy.CLOUD_ONLY:
        return Lane.CLOUD
    if policy is RouterPolicy.CLOUD_FIRST and cloud_configured and not (cloud_failing and local_model):
        return Lane.CLOUD
    if local_model:
        return Lane.LOCAL
    return Lane.CLOUD if cloud_configured else None


def after_local_refusal(exc: RequestError, policy: RouterPolicy, *, cloud_configured: bool) -> Verdict:
    """What becomes of a request the local side refused with ``exc``."""
    if isinstance(exc, _TRANSIENT):
        return Verdict.RETRY
    if policy is not RouterPolicy.LOCAL_ONLY and cloud_configured and falls_back(exc):
        return Verdict.CLOUD
    return Verdict.FAIL


def waits_for_cloud(policy: RouterPolicy) -> bool:
    """Whether a pending request the cloud could not take now must wait for the cloud (rather
    than stay pending, for the local side to take when it can)."""
    return policy is RouterPolicy.CLOUD_ONLY
