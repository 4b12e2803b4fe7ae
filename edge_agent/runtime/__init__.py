"""Running a packaged model with ONNX Runtime.

- ``session``    the decoder-with-past ONNX graph and its KV buffers.
- ``generator``  the generation loop: prompt in, text deltas out, stop sequences and limits.
- ``sampling``   logit bias and penalties, then greedy, temperature, top-k, top-p.
- ``structured`` response_format grammars enforced while decoding (llguidance).
- ``text``       prompts → ids; ids → final text, incrementally.
- ``chat``       chat templates rendered as transformers renders them; end-of-turn ids.
- ``channel``    generation output from the model's thread to the event loop.
- ``host``       ``ModelHost``: the model being served, swapped atomically, one generation at a time.

Public to ``cloud`` (packaging checks and the pool run on it); imports only ``shared``.
"""
