"""``naive-same-artifact``: the naive server, serving what Kiln serves. FastAPI + uvicorn, one
process, one model call per request (no batching), but the model is the very artifact
``kiln optimize`` selected, loaded through Kiln's backend exactly as the engine loads it
(:func:`serving.loader.load_version`: sha256 checked, the backend's runner, the tokenizer of a
text model, the engine's thread count), so the gap to ``kiln`` is what the gateway, the engine's
queues and batching cost or save, not what the optimizer did.

``KILN_HOME=HOME python bench/servers/naive_same_artifact.py --model digits|minilm --version V
--port P [--threads N]``

``POST /predict``: the same bodies and answers as ``naive_fastapi.py``: ``{"inputs": [[...]]}``
(digits: a batch of 1x8x8 images as nested lists) -> ``{"logits": [[...]], "labels": [...]}``;
``{"text": "..."}`` (minilm) -> ``{"embedding": [...]}``. Each request is checked
(``LoadedModel.check``: names, dtypes, shapes, finite values; 400 when it fails) and run
(``LoadedModel.run``) on its own, on the event loop (``async def``: no thread pool hop, the
thinnest FastAPI server there is). ``GET /health`` is 200 once the model is loaded and warmed up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # kiln and serving from this checkout
    sys.path.insert(0, str(ROOT))

from kiln.backends import default_threads
from kiln.errors import InvalidInput
from kiln.settings import get_settings
from kiln.spec import numpy_of_datatype
from serving.loader import LoadedModel, load_version, warm_up


class ImageRequest(BaseModel):
    inputs: list[Any]  # nested lists of floats


class TextRequest(BaseModel):
    text: str


def predict(model: LoadedModel, array: np.ndarray) -> list[np.ndarray]:
    """The outputs (spec order) of one model call for one request: the engine's check and run,
    as for a batch of one."""
    try:
        served = model.check({model.served[0].name: array})
    except InvalidInput as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return model.run(served)


def build_app(name: str, version: str, threads: int) -> FastAPI:
    model = load_version(get_settings(), name, version, "cpu", threads=threads)
    if len(model.served) != 1:
        raise SystemExit(f"{name}@{version} takes {len(model.served)} inputs; this server one")
    warm_up(model, {1})  # as the engine does before it answers /health (batch 1: all it runs)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "served": f"{model.backend}/{model.precision}"}

    if model.tokenizer is not None:

        @app.post("/predict")
        async def embed(req: TextRequest) -> dict[str, list[float]]:
            embedding = predict(model, np.array([req.text], dtype=object))[0]
            return {"embedding": embedding[0].tolist()}
    else:
        dtype = numpy_of_datatype(model.served[0].datatype)

        @app.post("/predict")
        async def classify(req: ImageRequest) -> dict[str, list[Any]]:
            logits = predict(model, np.asarray(req.inputs, dtype=dtype))[0]
            return {"logits": logits.tolist(), "labels": logits.argmax(axis=1).tolist()}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=["digits", "minilm"])
    parser.add_argument("--version", required=True, help="the version Kiln serves")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: the engine's, all the CPUs this process may use)",
    )
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.model, args.version, args.threads or default_threads()),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
