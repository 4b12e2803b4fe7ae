"""Chat rendering and prompt encoding, as transformers' apply_chat_template does them (fast)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors

from edge_agent.runtime.chat import ChatTemplate, end_of_turn_ids, turn_end_token_id
from edge_agent.runtime.text import IncrementalText, Prompt

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokenizer() -> Tokenizer:
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "hi", "there", "user", "assistant", "system"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    # Like SmolLM2's: the post-processor puts BOS (<|im_start|>) in front of every encoding.
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    return tok


def _folder(tmp_path: Path, **config: object) -> Path:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_chat_prompt_is_encoded_without_a_second_bos(tmp_path: Path) -> None:
    tok = _tokenizer()
    template = ChatTemplate.from_folder(_folder(tmp_path, chat_template=CHATML, eos_token="<|im_end|>"))
    prompt = template.prompt([{"role": "user", "content": "hi"}])
    assert prompt.text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.encode(tok) == [1, 5, 3, 2, 1, 6]  # the template's own <|im_start|> only
    assert Prompt("hi there").encode(tok) == [1, 3, 4]  # a completion: the tokenizer's default


def test_turn_end_token_comes_from_the_template(tmp_path: Path) -> None:
    tok = _tokenizer()
    template = ChatTemplate.from_folder(_folder(tmp_path, chat_template=CHATML))
    assert template.turn_end_text() == "<|im_end|>\n"
    assert turn_end_token_id(template, tok) == 2
    # The generation config's EOS, the tokenizer's EOS and the template's turn end, once each.
    assert end_of_turn_ids([0], tok, template) == [0, 2]


def test_templates_that_close_no_turn_add_no_id(tmp_path: Path) -> None:
    tok = _tokenizer()
    glm_like = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
    template = ChatTemplate.from_folder(_folder(tmp_path, chat_template=glm_like))
    assert turn_end_token_id(template, tok) is None
    fallback = ChatTemplate.from_folder(tmp_path / "nothing")
    assert fallback.source == "fallback" and fallback.turn_end_text() is None


def test_environment_matches_transformers(tmp_path: Path) -> None:
    """tojson keeps non-ASCII and does not HTML-escape; loop controls work; the special tokens of
    special_tokens_map.json are variables, tokenizer_config.json's win."""
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<old>", "pad_token": {"content": "<pad>"}})
    )
    text = (
        "{{ bos_token }}{{ pad_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}"
    )
    template = ChatTemplate.from_folder(_folder(tmp_path, chat_template=text, bos_token="<s>"))
    out = template.render([{"role": "user", "content": "café <b>&"}, {"role": "user", "content": "x"}])
    assert out == '<s><pad>{"role": "user", "content": "café <b>&"}'


def test_incremental_text_equals_decoding_everything_at_once() -> None:
    from tokenizers import decoders
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["plain ascii text"] * 10, trainer)
    text = "naïve café — 日本語 🚀 done"
    ids = tok.encode(text).ids
    inc = IncrementalText(tok, ())
    pieces = [inc.push(i) for i in ids]
    assert "".join(pieces) + inc.finish() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters are never split


def test_incremental_text_decodes_a_bounded_window_per_token() -> None:
    """Linear, not quadratic: over 3,000 tokens each push decodes a few ids, not the whole output."""
    from tokenizers import decoders
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["plain ascii text"] * 10, trainer)
    ids = tok.encode("the output grows: café 日本語 " * 150).ids
    assert len(ids) > 3000

    class Counting:
        decoded = 0

        def decode(self, chunk: list[int]) -> str:
            Counting.decoded += len(chunk)
            return tok.decode(chunk)

    inc = IncrementalText(Counting(), ())  # type: ignore[arg-type]
    text = "".join(inc.push(i) for i in ids) + inc.finish()
    assert text == tok.decode(ids)
    assert Counting.decoded < 10 * len(ids), Counting.decoded


class _Letters:
    """A tokenizer whose token i is the i-th letter of the alphabet (decode only)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def test_text_held_back_for_a_stop_sequence_never_leaks_its_start() -> None:
    """While the answer is shorter than the longest stop sequence, nothing goes out: its start
    may be a stop sequence's (a negative slice end once sent "ab" of a stop "abcdef")."""
    inc = IncrementalText(_Letters(), ("abcdef",))  # type: ignore[arg-type]
    assert [inc.push(i) for i in range(6)] == [""] * 6
    assert inc.stopped and inc.emitted == "" and inc.finish() == ""
    other = IncrementalText(_Letters(), ("abcdef",))  # type: ignore[arg-type]
    assert "".join(other.push(i) for i in (0, 1, 2, 3, 25)) + other.finish() == "abcdz"
    # An empty stop sequence would match at once: it stops nothing.
    empty = IncrementalText(_Letters(), ("",))  # type: ignore[arg-type]
    assert "".join(empty.push(i) for i in range(3)) + empty.finish() == "abc" and not empty.stopped


def test_legacy_logprobs_keep_byte_tokens_apart_and_offsets_in_the_text() -> None:
    """Legacy completions name a token whose bytes are not whole characters ``bytes:\\xNN``, as
    OpenAI does (decoded with replacement, the pieces of an emoji were all "\ufffd" and its
    alternatives overwrote each other); offsets count the text's characters, a token inside a
    character starting where the character does."""
    from edge_agent.runtime.logprobs import TokenLogprob
    from edge_agent.serving.service import _completion_logprobs

    smile = "\U0001f642".encode()  # four bytes, in two tokens
    scored = [
        TokenLogprob(b"A", -0.1, ((b"A", -0.1), (b"B", -2.5))),
        TokenLogprob(smile[:2], -0.2, ((smile[:2], -0.2), (b"\xf0\x9f\x98", -1.5), (b"\xe4\xbd", -3.0))),
        TokenLogprob(smile[2:], -0.3, ((smile[2:], -0.3), (b"\x98\x80", -2.0))),
        TokenLogprob(" é".encode(), -0.4, ()),
    ]
    lp = _completion_logprobs(scored)
    assert lp.tokens == ["A", "bytes:\\xf0\\x9f", "bytes:\\x99\\x82", " é"]
    assert [len(alts) for alts in lp.top_logprobs] == [2, 3, 2, 1]  # none lost to a shared key
    assert lp.top_logprobs[1]["bytes:\\xe4\\xbd"] == -3.0
    text = "A\U0001f642 é"
    assert lp.text_offset == [0, 1, 1, 2] and text[2:] == " é"
