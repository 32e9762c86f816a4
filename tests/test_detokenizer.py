"""Incremental detokenization: UTF-8 safety, stop strings held back, include_stop_str_in_output."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.demo import ensure_demo_model
from server.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_demo_model())


def _run(tokenizer, text: str, stop=(), include=False, prompt_text="Say: "):
    prompt = tokenizer.encode(prompt_text)
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, prompt, list(stop), include, True)
    pieces = [detok.step(t) for t in tokenizer.encode(text)]
    if detok.stopped_by is None:
        pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.parametrize("text", ["Hello world, how are you?", "naïve café — ünïcödé", "日本語のテキスト 🙂🚀 ok", "  spaced\n\nlines\t"])
def test_streamed_text_equals_decode(tokenizer, text):
    pieces, _ = _run(tokenizer, text)
    assert "".join(pieces) == tokenizer.decode(tokenizer.encode(text))
    assert all("\ufffd" not in p for p in pieces), "a partial UTF-8 sequence leaked"


def test_stop_string_is_cut_and_never_partially_sent(tokenizer):
    pieces, detok = _run(tokenizer, "alpha beta STOP gamma delta", stop=["STOP"])
    assert "".join(pieces) == "alpha beta "
    assert detok.stopped_by == "STOP"
    assert not any("S" in p for p in pieces)


def test_include_stop_str_in_output(tokenizer):
    pieces, _ = _run(tokenizer, "alpha beta STOP gamma", stop=["STOP"], include=True)
    assert "".join(pieces) == "alpha beta STOP"


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tokenizer):
    pieces, detok = _run(tokenizer, "one ST two STO three", stop=["STOP"])
    assert detok.stopped_by is None
    assert "".join(pieces) == "one ST two STO three"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    pieces, detok = _run(tokenizer, "x y END z HALT", stop=["HALT", "END"])
    assert "".join(pieces) == "x y "
    assert detok.stopped_by == "END"


def test_an_unfinished_utf8_sequence_at_the_end_is_flushed_like_decode(tokenizer):
    ids = tokenizer.encode("ok 🙂")
    cut = ids[:-1]  # the emoji's last byte-token is missing
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, [], [], False, True)
    text = "".join(detok.step(t) for t in cut) + detok.flush()
    assert text == tokenizer.decode(cut) and text.endswith("\ufffd")


def test_stop_strings_are_ignored_until_check_stop(tokenizer):
    """Before min_tokens the engine passes check_stop=False: a stop string then neither cuts nor waits."""
    detok = IncrementalDetokenizer(tokenizer.backend_tokenizer, [], ["STOP"], False, True)
    ids = tokenizer.encode("a STOP b STOP c")
    first = tokenizer.encode("a STOP b")
    pieces = [detok.step(t, check_stop=i >= len(first)) for i, t in enumerate(ids)]
    assert detok.stopped_by == "STOP"
    assert "".join(pieces) == "a STOP b "


def test_spaces_between_special_tokens_false_joins_added_tokens():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "world": 2, "[A]": 3, "[B]": 4}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.decoder = decoders.WordPiece()  # writes a space before every token but word pieces
    wordpiece.add_special_tokens([AddedToken("[A]", special=True), AddedToken("[B]", special=True)])

    def text(spaces: bool, skip: bool = False) -> str:
        detok = IncrementalDetokenizer(wordpiece, [], [], False, skip, spaces)
        return "".join(detok.step(t) for t in [1, 3, 4, 2]) + detok.flush()

    assert text(spaces=True) == "hello [A] [B] world"
    assert text(spaces=False) == "hello [A][B] world"  # vLLM's rule: only between two added tokens
    assert text(spaces=False, skip=True) == "hello world"
