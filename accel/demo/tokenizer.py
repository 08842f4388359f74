"""The demo model's word-level tokenizer: the synthetic captions' vocabulary, built in code (nothing downloaded).

A `tokenizers` WordLevel model (lower-cased, punctuation dropped, split on whitespace) wrapped in
`transformers.PreTrainedTokenizerFast`, so diffusers' `WanPipeline` uses it unchanged: it pads to
``max_sequence_length`` with ``<pad>`` (id 0) and appends ``</s>`` (id 1) like UMT5's tokenizer.

- Unknown words map to ``<unk>`` (id 2): "a crimson square" reads as "a <unk> square", so the model sees the
  shape but no colour. Prompts are lower-cased first, and punctuation is dropped ("Right." -> "right").
- ``<null>`` is removed before tokenising, so the caption ``<null>`` encodes exactly like the empty prompt
  ``""`` (just ``</s>``). The recipe captions a fraction of the training clips ``<null>`` (caption dropout):
  that trains the unconditional branch that classifier-free guidance calls with WanPipeline's default
  negative prompt ``""``, while the dataset loader (which refuses empty captions) sees a normal caption.
"""

from __future__ import annotations

from typing import Any

from accel.lora.synthetic import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIALS = (PAD, EOS, UNK)
NULL_CAPTION = "<null>"
FILLER = ("a", "an", "the", "moving", "shape", "video", "of", "is", "and", "to", "going", "towards", "object")


def vocabulary() -> tuple[str, ...]:
    """The demo vocabulary in id order: specials, the synthetic dataset's attribute words, then filler words."""
    words = [*SPECIALS, *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS, *SIZES, *FILLER]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(seen)


def build_tokenizer(vocab: tuple[str, ...] | None = None, *, model_max_length: int = 16) -> Any:
    """A `PreTrainedTokenizerFast` over `vocab` (default `vocabulary()`), padding with id 0 and ending with ``</s>``.

    `vocab` must start with ``<pad>, </s>, <unk>`` (UMT5's pad and eos ids 0 and 1) and hold each word once.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary() if vocab is None else tuple(vocab)
    if vocab[: len(SPECIALS)] != SPECIALS:
        raise ValueError(f"vocab must start with {SPECIALS}, got {vocab[:len(SPECIALS)]}")
    words_ok = all(isinstance(w, str) and w and not any(c.isspace() for c in w) for w in vocab)
    if len(set(vocab)) != len(vocab) or not words_ok:
        raise ValueError(f"vocab must hold distinct non-empty words without spaces, got {vocab!r}")
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
        raise ValueError(f"model_max_length must be a whole number >= 2, got {model_max_length!r}")
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([
        normalizers.Replace(NULL_CAPTION, " "),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[^\w\s]"), " "),  # punctuation -> space
    ])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, ids[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=model_max_length)


__all__ = ["EOS", "FILLER", "NULL_CAPTION", "PAD", "SPECIALS", "UNK", "build_tokenizer", "vocabulary"]
