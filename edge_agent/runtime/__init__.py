"""Running a packaged model with ONNX Runtime.

- ``session``    the decoder-with-past ONNX graph, its KV buffers and the prefix cache.
- ``generator``  one request's generation (``Sequence``): prompt in, text deltas out, stops, limits.
- ``sampling``   logit bias and penalties, then greedy, temperature, top-k, top-p.
- ``structured`` response_format and guided_* grammars enforced while decoding (llguidance).
- ``tools``      tool calling: tools into the chat template, calls forced by grammar, parsed back.
- ``logprobs``   logprobs of generated tokens from the model's own distribution.
- ``text``       prompts → ids; ids → final text, incrementally.
- ``chat``       chat templates rendered as transformers renders them; end-of-turn ids.
- ``channel``    generation output from the model's thread to the event loop.
- ``batcher``    parallel slots: requests decoding together in one batched step per token.
- ``host``       ``ModelHost``: the model being served, swapped atomically; admission and 429.

Public to ``cloud`` (packaging checks and the pool run on it); imports only ``shared``.
"""
