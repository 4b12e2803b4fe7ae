"""The demonstration model: a small GLM trained briefly on local text, with a local BPE tokenizer.

Nothing comes from a hub. The result is an ordinary Hugging Face folder, so it goes through the
same ``model package`` path as a user's model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud.packaging.corpus import training_text

SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class DemoModelSpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    context_length: int = 512
    train_steps: int = 400
    seq_len: int = 128
    batch_size: int = 16
    learning_rate: float = 3e-3
    train_bytes: int = 3_000_000
    seed: int = 0


@dataclass(frozen=True)
class DemoModelReport:
    path: Path
    parameters: int
    first_loss: float
    final_loss: float
    seconds: float


def train_tokenizer(text: str, vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL
    )
    fast.save_pretrained(str(out))


def build_demo_model(
    out: Path,
    spec: DemoModelSpec | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> DemoModelReport:
    """Write a trained demo GLM model folder to ``out``; ``progress(step, total, loss)`` is called."""
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    spec = spec or DemoModelSpec()
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    text = training_text(spec.train_bytes)
    train_tokenizer(text, spec.vocab_size, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id(SPECIAL)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)

    torch.manual_seed(spec.seed)
    config = GlmConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden_size // spec.heads,
        max_position_embeddings=spec.context_length,
        pad_token_id=eos,
        eos_token_id=eos,
        bos_token_id=eos,
        tie_word_embeddings=True,
    )
    model = GlmForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.learning_rate, total_steps=spec.train_steps, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    first_loss = final_loss = float("nan")
    for step in range(spec.train_steps):
        starts = torch.randint(0, len(ids) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + spec.seq_len + 1] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        # labels are shifted inside the model; feeding the same window keeps it a plain LM loss.
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        final_loss = float(loss.item())
        if step == 0:
            first_loss = final_loss
        if progress is not None:
            progress(step + 1, spec.train_steps, final_loss)
    model.eval()
    model.save_pretrained(str(out))
    GenerationConfig(eos_token_id=eos, bos_token_id=eos, pad_token_id=eos).save_pretrained(str(out))
    (out / "demo_model.json").write_text(
        json.dumps({"spec": spec.__dict__, "parameters": params, "final_loss": final_loss}, indent=2)
    )
    return DemoModelReport(out, params, first_loss, final_loss, time.monotonic() - started)
