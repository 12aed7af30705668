"""Incremental detokenizer: deltas vs. decode(), split UTF-8 characters, stop strings."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from ttscale.loader.default_model import default_model_path
from ttscale.sampling.detokenizer import IncrementalDetokenizer
from ttscale.sampling.params import SamplingParams
from ttscale.tokenizer import Tokenizer

PROMPT = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "Hello, world! How are you today?",
    "😀👍🏽 emoji 🇫🇷 family 👨‍👩‍👧 done",
    "日本語のテキストと中文字符，还有한국어.",
    "café naïve façade Ωμέγα Привет — “quotes” …",
    "line one\n\nline two\r\n\tindented\n   spaced  end  ",
    "mixed: a😀b日c\u0301d 🧑🏿‍🚀!",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    path = default_model_path()
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return Tokenizer(hf)


def stream(
    tokenizer: Tokenizer, ids: list[int], params: SamplingParams | None = None
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feeds ids one by one (stopping at a stop string), then finishes; returns the deltas."""
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), params or SamplingParams())
    deltas: list[str] = []
    for token in ids:
        delta = detok.append(token)
        if delta is None:
            break
        deltas.append(delta)
        assert detok.text == "".join(deltas)
        if detok.stopped:
            break
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return detok, deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert not detok.stopped and detok.token_ids == ids


def test_characters_are_emitted_as_soon_as_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" 😀", add_special_tokens=False)
    assert len(ids) == 2  # the emoji's bytes are split across the two tokens
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    assert detok.append(ids[0]) == ""
    assert detok.append(ids[1]) == " 😀"
    assert detok.finish() == ""


def test_random_token_ids_match_decode(tokenizer: Tokenizer) -> None:
    """Arbitrary ids (invalid UTF-8 byte runs, special tokens) still concatenate to decode()."""
    rng = random.Random(0)
    for skip in (True, False):
        params = SamplingParams(skip_special_tokens=skip)
        for _ in range(5):
            ids = [rng.randrange(tokenizer.vocab_size) for _ in range(200)]
            _, deltas = stream(tokenizer, ids, params)
            assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_decodes_a_bounded_window_per_token(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    assert len(ids) > 1000
    lengths: list[int] = []
    original = tokenizer.decode

    def spy(token_ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
        lengths.append(len(token_ids))
        return original(token_ids, skip_special_tokens)

    tokenizer.decode = spy  # type: ignore[method-assign]
    try:
        _, deltas = stream(tokenizer, ids)
    finally:
        del tokenizer.decode
    assert "".join(deltas) == tokenizer.decode(ids)
    assert max(lengths) <= 8  # a few tokens, not the whole output
    assert len(lengths) <= 2 * len(ids) + 2


def test_special_tokens_follow_skip_special_tokens(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode("Done.", add_special_tokens=False), 2]  # 2: <|im_end|>
    _, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == "Done."
    _, deltas = stream(tokenizer, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(deltas) == "Done.<|im_end|>"


# ---------------------------------------------------------------------------- stop strings


def test_stop_string_spanning_tokens_truncates(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The answer is 42.\nEND of story", add_special_tokens=False)
    # "\nEND" spans two tokens ("\n", "END").
    assert not any("\nEND" in tokenizer.decode([t]) for t in ids)
    detok, deltas = stream(tokenizer, ids, SamplingParams(stop=["\nEND"]))
    assert detok.stopped and detok.stop_reason == "\nEND"
    assert detok.text == "".join(deltas) == "The answer is 42."
    assert detok.append(ids[-1]) is None  # ignored once stopped


def test_include_stop_str_in_output(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The answer is 42.\nEND of story", add_special_tokens=False)
    params = SamplingParams(stop=["\nEND"], include_stop_str_in_output=True)
    detok, deltas = stream(tokenizer, ids, params)
    assert detok.stopped and "".join(deltas) == "The answer is 42.\nEND"


def test_stop_prefix_is_held_back_until_resolved(tokenizer: Tokenizer) -> None:
    text = "Go STOP_NOT yet STOP_NOW tail"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["STOP_NOW"]))
    emitted = ""
    for token in ids:
        delta = detok.append(token)
        assert delta is not None
        emitted += delta
        # Never any text the final answer lacks, i.e. never a part of the real stop string.
        assert "Go STOP_NOT yet ".startswith(emitted)
        if detok.stopped:
            break
        # Text that could still grow into "STOP_NOW" is never streamed.
        assert not emitted.endswith(("S", "ST", "STOP", "STOP_", "STOP_N", "STOP_NO"))
    assert detok.stopped and emitted == detok.text == "Go STOP_NOT yet "


def test_held_back_text_is_flushed_by_finish(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("almost STOP_", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["STOP_NOW"]))
    streamed = "".join(detok.append(t) or "" for t in ids)
    assert streamed == "almost "
    assert detok.finish() == "STOP_"
    assert detok.text == "almost STOP_" and not detok.stopped


def test_earliest_of_several_stop_strings_wins(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    detok, _ = stream(tokenizer, ids, SamplingParams(stop=["delta", "a b"]))
    assert detok.stop_reason == "a b" and detok.text == "alph"


def test_multibyte_stop_string(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("smile 😀 and 日本 more", add_special_tokens=False)
    detok, deltas = stream(tokenizer, ids, SamplingParams(stop=["😀"]))
    assert detok.text == "smile " and not any("\ufffd" in d for d in deltas)
    detok, _ = stream(tokenizer, ids, SamplingParams(stop=["本"], include_stop_str_in_output=True))
    assert detok.text == "smile 😀 and 日本"


def test_prompt_ending_inside_a_character(tokenizer: Tokenizer) -> None:
    head, tail = tokenizer.encode(" 😀", add_special_tokens=False)
    ids = [tail, *tokenizer.encode(" ok", add_special_tokens=False)]
    detok = IncrementalDetokenizer(tokenizer, [head], SamplingParams())
    text = "".join(detok.append(t) or "" for t in ids) + detok.finish()
    assert text == tokenizer.decode(ids)
