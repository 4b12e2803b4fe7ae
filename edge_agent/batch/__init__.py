"""OpenAI's Batch API on the device: requests that run when the device is idle or wait out an outage.

- ``journal``     ``BatchJournal``: files, batches and one row per request, durable (SQLite, WAL);
  each result written exactly once.
- ``states``      the request and batch state machines, their transitions in one table each.
- ``input_file``  reading and checking a batch input file (JSONL) before a batch exists.
- ``policy``      where a request goes under the router policy (pure decisions).
- ``gate``        ``CloudGate``: backoff with jitter while the cloud cannot be reached.
- ``idle``        whether the device is idle: interactive requests always come first.
- ``executor``    ``ItemExecutor``: one request, locally or in the cloud, into its result line.
- ``worker``      ``BatchWorker``: the background loops the app's lifespan owns.
- ``service``, ``routes``  the Files and Batches endpoints (logic, thin routes).

Sits above ``routing`` and ``serving`` (it runs requests through them), below ``api``.
"""

from edge_agent.batch.executor import ItemExecutor
from edge_agent.batch.idle import ActivityMeter, IdleSignal, InteractiveActivity
from edge_agent.batch.journal import BatchJournal
from edge_agent.batch.routes import batch_routes
from edge_agent.batch.service import BatchService
from edge_agent.batch.worker import BatchWorker

__all__ = [
    "ActivityMeter",
    "BatchJournal",
    "BatchService",
    "BatchWorker",
    "IdleSignal",
    "InteractiveActivity",
    "ItemExecutor",
    "batch_routes",
]
