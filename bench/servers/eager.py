"""Loading the example models the way a user does: eager fp32 PyTorch, no Kiln runtime.

Shared by the two baseline servers of ``bench/serve_bench.py`` (``naive_fastapi.py`` and
``litserve_plain.py``), so both serve exactly the same module:

- ``digits``: a ``torch.export`` archive; ``torch.export.load(path).module()`` is the eager module.
- ``minilm``: a ``kiln.yaml`` folder; its ``factory`` is called with ``config`` and the
  safetensors ``weights`` are loaded into it (as ``kiln upload`` does), and ``tokenizer.json``
  is the tokenizer (truncating at 128 tokens, padding a batch to its longest row).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer


def load_eager(path: str | Path) -> torch.nn.Module:
    """The eager fp32 module of a ``.pt2`` archive or a ``kiln.yaml`` folder, in eval mode."""
    path = Path(path)
    if path.is_dir():
        spec = yaml.safe_load((path / "kiln.yaml").read_text())
        module_name, func_name = spec["factory"].split(":")
        model = getattr(importlib.import_module(module_name), func_name)(**spec.get("config", {}))
        model.load_state_dict(load_file(path / spec["weights"]), strict=True)
        return model.eval()
    return torch.export.load(str(path)).module()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The ``tokenizer.json`` named by a ``kiln.yaml`` folder's ``preprocess``."""
    path = Path(path)
    spec = yaml.safe_load((path / "kiln.yaml").read_text())
    return Tokenizer.from_file(str(path / spec["preprocess"]["file"]))


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> dict[str, Any]:
    """``input_ids`` and ``attention_mask`` int64 tensors for ``texts`` (padded to the longest)."""
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64),
    }
