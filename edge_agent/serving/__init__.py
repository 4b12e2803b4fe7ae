"""The OpenAI-compatible serving surface, shared by the edge agent and the cloud pool.

- ``service``        ``CompletionService``: requests → a ``TextBackend`` → OpenAI responses.
- ``openai_routes``  the thin FastAPI routes over a responder.
- ``errors``         the OpenAI error envelope and the handlers that produce it.
- ``sse``            relaying an upstream stream so that a broken one ends with an error event.
- ``streaming``      ``EventStream``: a streaming answer that stops when its client leaves.
- ``server``         logging and uvicorn settings for every service process.
- ``auth``, ``body_limit``  the bearer-key check and the request-size cap.
- ``config``         ``ServingConfig``: defaults overlaid by configuration layers.

Public to ``cloud``; imports only ``runtime`` and ``shared`` (never the agent's uplink, update
or settings): callers hand in defaults and an on-finished callback.
"""
