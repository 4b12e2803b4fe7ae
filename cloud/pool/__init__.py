"""One replica of the cloud GPU pool: ``autoglm pool serve``.

- ``engine``    continuous batching over a Hugging Face causal LM (PyTorch).
- ``server``    the OpenAI-compatible API (``edge_agent.serving``) over the engine.
- ``settings``  validated before the model loads.
- ``cli``       the command.
"""
