"""A text model's batch runs its texts in parts of similar token length (serving/loader.py
``LoadedModel._run_texts``): each part padded to its own longest text, outputs back in row
order. The tokenizer is a real ``tokenizers`` one (a word-level vocabulary built here); the
model a numpy function whose output row says which tokens it saw."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from kiln.spec import ModelSpec, Preprocess, TensorSpec
from serving.loader import LoadedModel

WORDS = [f"w{i}" for i in range(1, 40)]
CALL_WIDTHS: list[tuple[int, int]] = []  # (rows, padded width) of each model call


def tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, **{w: i for i, w in enumerate(WORDS, start=1)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = Whitespace()
    tok.enable_truncation(64)
    tok.enable_padding()
    return tok


def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
    ids, mask = inputs
    CALL_WIDTHS.append(ids.shape)
    # per row: the sum of its token ids and its true length (padding contributes nothing)
    return [np.stack([(ids * mask).sum(axis=1), mask.sum(axis=1)], axis=1).astype(np.float32)]


def model(outputs_shape: list[int]) -> LoadedModel:
    spec = ModelSpec(
        inputs=[
            TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1]),
            TensorSpec(name="attention_mask", datatype="INT64", shape=[-1, -1]),
        ],
        outputs=[TensorSpec(name="scores", datatype="FP32", shape=outputs_shape)],
        preprocess=Preprocess(),
    )
    return LoadedModel(
        name="t", version="1.0.0", spec=spec, runner=run, memory_bytes=1, tokenizer=tokenizer()
    )


def texts(lengths: list[int]) -> np.ndarray:
    return np.array([" ".join(WORDS[i : i + n]) for i, n in enumerate(lengths)], dtype=object)


def expected(lengths: list[int]) -> np.ndarray:
    return np.array(
        [[sum(range(i + 1, i + n + 1)), n] for i, n in enumerate(lengths)], dtype=np.float32
    )


def test_texts_of_mixed_length_run_in_parts_and_come_back_in_order() -> None:
    lengths = [3, 20, 4, 21, 3, 8, 25, 9, 1]
    CALL_WIDTHS.clear()
    (out,) = model([-1, 2]).run([texts(lengths)])
    np.testing.assert_array_equal(out, expected(lengths))
    assert sum(rows for rows, _ in CALL_WIDTHS) == len(lengths)
    assert len(CALL_WIDTHS) > 1
    # each part's width is its own longest: far less padding than one call at width 25
    assert sum(r * w for r, w in CALL_WIDTHS) < len(lengths) * max(lengths) / 2


def test_similar_lengths_stay_one_call_and_token_level_outputs_are_never_split() -> None:
    CALL_WIDTHS.clear()
    (out,) = model([-1, 2]).run([texts([10, 11, 12])])
    np.testing.assert_array_equal(out, expected([10, 11, 12]))
    assert CALL_WIDTHS == [(3, 12)]
    CALL_WIDTHS.clear()
    (out,) = model([-1, -1]).run([texts([2, 30])])  # per-token outputs: one padded call
    np.testing.assert_array_equal(out, expected([2, 30]))
    assert CALL_WIDTHS == [(2, 30)]
