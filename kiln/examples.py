"""Factories for the example models that ship as a folder (``kiln.yaml`` + safetensors).

A ``kiln.yaml`` names ``factory: kiln.examples:minilm``; upload imports it, calls it with the
file's ``config`` as keyword arguments, and loads ``weights`` into the result with
``load_state_dict(..., strict=True)``. Heavy libraries (transformers) are imported inside the
factories, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: Keys of a Hugging Face ``BertModel`` checkpoint that :func:`minilm` has no use for: the
#: pooler (sentence embeddings mean-pool instead) and a buffer that is not part of the state.
_UNUSED_PREFIXES = ("pooler.", "embeddings.position_ids")


class MeanPooledEncoder(nn.Module):
    """A transformer encoder whose token states are mean-pooled over the mask, then L2-normalised.

    ``forward(input_ids, attention_mask)`` takes int64 ``[batch, seq]`` tensors and returns
    float32 ``[batch, hidden]`` unit vectors, as sentence-transformers' Transformer -> Pooling
    (mean) -> Normalize pipeline does.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        # A row with an all-zero mask (padding only) pools to zeros rather than NaN.
        pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def minilm(**config: Any) -> nn.Module:
    """The all-MiniLM-L6-v2 sentence encoder: a BERT encoder, mean-pooled and L2-normalised.

    Args:
        **config: ``transformers.BertConfig`` values (``vocab_size``, ``hidden_size``...), as in
            the model's ``config.json``. ``attn_implementation`` defaults to ``"sdpa"``, which
            ``torch.export`` captures with dynamic batch and sequence dimensions.

    Returns:
        An eval-mode module with randomly initialised weights, whose state dict matches
        :func:`minilm_state_dict` of the Hugging Face checkpoint (``strict=True``).
    """
    from transformers import BertConfig, BertModel

    config = {"attn_implementation": "sdpa", **config}
    encoder = BertModel(BertConfig(**config), add_pooling_layer=False)
    return MeanPooledEncoder(encoder).eval()


def minilm_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-key a Hugging Face ``BertModel`` checkpoint (as sentence-transformers ships it) for
    :func:`minilm`: every key gains the ``encoder.`` prefix; the pooler and ``position_ids``,
    which the module does not hold, are dropped."""
    return {
        f"encoder.{key}": value.contiguous()
        for key, value in tensors.items()
        if not key.startswith(_UNUSED_PREFIXES)
    }
