"""``naive-fastapi``: the server a user writes first. FastAPI + uvicorn, one process, the eager
fp32 model, one forward per request.

``python bench/servers/naive_fastapi.py --model digits|minilm --path SOURCE --port P``

``POST /predict``: ``{"inputs": [[...]]}`` (digits: a batch of 1x8x8 images as nested lists) ->
``{"logits": [[...]], "labels": [...]}``; ``{"text": "..."}`` (minilm) -> ``{"embedding": [...]}``.
``GET /health`` is 200 once the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eager import load_eager, load_tokenizer, tokenize


class ImageRequest(BaseModel):
    inputs: list


class TextRequest(BaseModel):
    text: str


def build_app(model_name: str, path: str) -> FastAPI:
    app = FastAPI()
    model = load_eager(path)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    if model_name == "minilm":
        tokenizer = load_tokenizer(path)

        @app.post("/predict")
        def embed(req: TextRequest) -> dict[str, list[float]]:
            with torch.inference_mode():
                embedding = model(**tokenize(tokenizer, [req.text]))
            return {"embedding": embedding[0].tolist()}
    else:

        @app.post("/predict")
        def classify(req: ImageRequest) -> dict[str, list]:
            x = torch.tensor(req.inputs, dtype=torch.float32)
            with torch.inference_mode():
                logits = model(x)
            return {"logits": logits.tolist(), "labels": logits.argmax(dim=1).tolist()}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=["digits", "minilm"])
    parser.add_argument("--path", required=True, help=".pt2 archive or kiln.yaml folder")
    parser.add_argument("--port", required=True, type=int)
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.model, args.path),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
