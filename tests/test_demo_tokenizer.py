"""The demo model's word-level tokenizer: every synthetic caption round-trips, unknown words map to <unk>, case and
punctuation are ignored, <null> encodes like the empty prompt (in WanPipeline too), and bad vocabularies are refused."""

import pytest
import torch

from accel.demo.config import MICRO
from accel.demo.tokenizer import NULL_CAPTION, build_tokenizer, vocabulary
from accel.lora.synthetic import clip_spec


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _ids(tok, text: str, length: int = 16) -> list[int]:
    return tok(text, padding="max_length", max_length=length, truncation=True).input_ids


def test_every_synthetic_caption_round_trips_without_unk(tok):
    unk = tok.unk_token_id
    for i in range(60):
        caption = clip_spec(3, i).caption
        ids = _ids(tok, caption)
        assert unk not in ids, caption
        assert tok.decode(ids, skip_special_tokens=True) == caption
        words = caption.split()
        assert ids[: len(words) + 1] == [tok.convert_tokens_to_ids(w) for w in words] + [tok.eos_token_id]
        assert set(ids[len(words) + 1:]) == {tok.pad_token_id}


def test_specials_match_umt5_ids_and_vocabulary_is_distinct(tok):
    vocab = vocabulary()
    assert vocab[:3] == ("<pad>", "</s>", "<unk>") and len(set(vocab)) == len(vocab) == len(tok)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 16


def test_unknown_words_map_to_unk_and_case_and_punctuation_are_ignored(tok):
    assert _ids(tok, "a crimson square")[:4] == [tok.convert_tokens_to_ids("a"), tok.unk_token_id,
                                                 tok.convert_tokens_to_ids("square"), tok.eos_token_id]
    assert _ids(tok, "A Red Square, moving RIGHT.") == _ids(tok, "a red square moving right")
    assert _ids(tok, "  a   red\tsquare ") == _ids(tok, "a red square")


def test_null_caption_encodes_like_the_empty_prompt(tok):
    assert _ids(tok, NULL_CAPTION) == _ids(tok, "") == [tok.eos_token_id] + [tok.pad_token_id] * 15


def test_truncation_keeps_the_length(tok):
    ids = _ids(tok, " ".join(["red"] * 40), length=8)
    assert len(ids) == 8


def test_wan_pipeline_uses_it_unchanged():
    from accel.demo.model import build_pipeline

    pipe = build_pipeline(MICRO)
    length = MICRO.text.max_sequence_length
    emb = lambda p: pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=length,  # noqa: E731
                                       device=torch.device("cpu"))[0]
    null, empty, caption = emb(NULL_CAPTION), emb(""), emb("a red square moving right")
    assert null.shape == (1, length, MICRO.text.d_model)
    torch.testing.assert_close(null, empty, rtol=0, atol=0)
    assert caption[0, :6].abs().sum(-1).gt(0).all() and caption[0, 6:].abs().sum() == 0  # 5 words + </s>, zeros


@pytest.mark.parametrize("vocab,match", [
    (("red", "<pad>", "</s>", "<unk>"), "must start with"),
    (("<pad>", "</s>", "<unk>", "red", "red"), "distinct"),
    (("<pad>", "</s>", "<unk>", "two words"), "without spaces"),
])
def test_bad_vocabulary_is_refused(vocab, match):
    with pytest.raises(ValueError, match=match):
        build_tokenizer(vocab)


def test_bad_length_is_refused():
    with pytest.raises(ValueError, match="model_max_length"):
        build_tokenizer(model_max_length=1)
