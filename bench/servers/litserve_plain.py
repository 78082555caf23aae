"""``litserve-plain``: a LitServe server as its docs teach, serving the eager fp32 model with
dynamic batching and ``fast_queue``.

``python bench/servers/litserve_plain.py --model digits|minilm --path SOURCE --port P
[--max-batch-size 32] [--batch-timeout 0.005]``

Same request and response bodies as ``naive_fastapi.py``: ``{"inputs": [[...]]}`` (digits, one
1x8x8 image per request) or ``{"text": "..."}`` (minilm). ``GET /health`` is LitServe's own (200
once the worker's ``setup`` is done).
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotations at run time.
import argparse
import sys
from pathlib import Path

import litserve as ls
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eager import load_eager, load_tokenizer, tokenize


class DigitsAPI(ls.LitAPI):
    """setup (load once per worker) -> decode_request -> batch -> predict -> unbatch ->
    encode_response."""

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def setup(self, device):
        self.model = load_eager(self.path)

    def decode_request(self, request):
        return torch.tensor(request["inputs"], dtype=torch.float32)

    def batch(self, inputs):
        return torch.cat(inputs)

    def predict(self, x):
        with torch.inference_mode():
            return self.model(x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"logits": [output.tolist()], "labels": [int(output.argmax())]}


class MiniLMAPI(ls.LitAPI):
    """setup (model + tokenizer) -> decode_request (the text) -> batch (tokenize together) ->
    predict -> unbatch -> encode_response."""

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def setup(self, device):
        self.model = load_eager(self.path)
        self.tokenizer = load_tokenizer(self.path)

    def decode_request(self, request):
        return request["text"]

    def batch(self, inputs):
        return tokenize(self.tokenizer, list(inputs))

    def predict(self, x):
        with torch.inference_mode():
            return self.model(**x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"embedding": output.tolist()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=["digits", "minilm"])
    parser.add_argument("--path", required=True, help=".pt2 archive or kiln.yaml folder")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    args = parser.parse_args()
    api_class = MiniLMAPI if args.model == "minilm" else DigitsAPI
    api = api_class(args.path, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
