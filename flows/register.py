"""Prefect flow: register Kiln's example models (``kiln demo``'s first steps)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from tasks.upload import upload_model


@dataclass(frozen=True)
class Example:
    name: str
    source: str  # relative to the project, produced by `dvc repro`
    dataset: str


EXAMPLES: tuple[Example, ...] = (
    Example("digits", "data/digits/model.pt2", "data/digits/val.npz"),
    Example("breast-cancer", "data/breast_cancer/model.pt2", "data/breast_cancer/val.npz"),
    Example("minilm", "data/minilm/model", "data/minilm/sentences.npz"),
)


@flow(name="register-examples", log_prints=True)
def register_examples(project: str = ".") -> list[dict[str, Any]]:
    """Upload each example model with its validation dataset (no-op when already stored)."""
    root = Path(project)
    results = []
    for ex in EXAMPLES:
        result = upload_model(ex.name, str(root / ex.source), dataset=str(root / ex.dataset))
        print(
            f"{ex.name}@{result['version']}: {'registered' if result['created'] else 'unchanged'}"
        )
        results.append(result)
    return results
