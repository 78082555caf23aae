"""The OIP v2 codec: JSON and Triton's binary extension, validated against a model's inputs."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.spec import TensorSpec
from serving import oip
from serving.gateway import normalise_path
from tests.conftest import binary_header

IMAGE = [TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])]
TEXT = [TensorSpec(name="text", datatype="BYTES", shape=[-1])]


def _json_body(
    data: object, shape: list[int], datatype: str = "FP32", name: str = "image"
) -> bytes:
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}
    ).encode()


def test_json_request_decodes_to_the_spec() -> None:
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    doc, tail = oip.parse(_json_body(x.reshape(-1).tolist(), [2, 1, 8, 8]), None)
    req = oip.request(doc, tail, IMAGE, max_rows=16)
    assert req.rows == 2
    np.testing.assert_array_equal(req.inputs["image"], x)


def test_binary_extension_roundtrip_numbers_and_bytes() -> None:
    x = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)
    raw = x.tobytes()
    header = binary_header([1, 1, 8, 8], len(raw), parameters={"binary_data_output": True})
    doc, tail = oip.parse(header + raw, str(len(header)))
    req = oip.request(doc, tail, IMAGE, max_rows=4)
    np.testing.assert_array_equal(req.inputs["image"], x)
    assert req.binary_default

    texts = [b"hello", b"", "h\u00e9".encode()]
    raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    header = binary_header([3], len(raw), "BYTES", "text")
    doc, tail = oip.parse(header + raw, str(len(header)))
    req = oip.request(doc, tail, TEXT, max_rows=4)
    assert list(req.inputs["text"]) == texts


def test_binary_response_carries_a_json_header_and_raw_tensors() -> None:
    out = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, length = oip.response(
        model="m", version="1.0.0", request_id="7", outputs={"logits": out}, binary={"logits"}
    )
    assert length is not None
    header = json.loads(body[:length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == out.nbytes
    assert header["id"] == "7"
    np.testing.assert_array_equal(np.frombuffer(body[length:], dtype="<f4").reshape(2, 3), out)
    body, length = oip.response(
        model="m", version="1.0.0", request_id=None, outputs={"logits": out}, binary=set()
    )
    assert length is None and json.loads(body)["outputs"][0]["data"] == out.reshape(-1).tolist()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "JSON"),
        (b"[1, 2]", "inputs"),
        (b'{"inputs": []}', "inputs"),
        (_json_body([0.0] * 64, [1, 1, 8, 8], name="pixels"), "pixels"),
        (_json_body([0.0] * 64, [1, 64]), "rank"),
        (_json_body([0.0] * 64, [1, 1, 4, 16]), "shape"),
        (_json_body([0.0] * 63, [1, 1, 8, 8]), "63 values"),
        (_json_body([0] * 64, [1, 1, 8, 8], datatype="INT64"), "datatype INT64"),
        (_json_body([], [0, 1, 8, 8]), "batch dimension is 0"),
        (_json_body([0.0] * 64 * 5, [5, 1, 8, 8]), "max_request_batch"),
        (_json_body(["a"] * 64, [1, 1, 8, 8]), "FP32"),
        (_json_body([0.0] * 64, [1, 1, 8, -8]), "negative"),
        (
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1,1,8,8], '
            b'"data": [1e400]}]}',
            "JSON",
        ),
    ],
)
def test_bad_requests_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(oip.BadRequest, match=field):
        doc, tail = oip.parse(body, None)
        oip.request(doc, tail, IMAGE, max_rows=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused(bad: float) -> None:
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    x[0, 0, 3, 3] = bad
    raw = x.tobytes()
    header = binary_header([1, 1, 8, 8], len(raw))
    doc, tail = oip.parse(header + raw, str(len(header)))
    with pytest.raises(oip.BadRequest, match="image.*NaN or infinite"):
        oip.request(doc, tail, IMAGE, max_rows=4)


def test_binary_size_mismatches_are_refused() -> None:
    raw = np.zeros(64, dtype=np.float32).tobytes()
    for size, tail in [(len(raw) + 4, raw), (len(raw), raw + b"xx")]:
        header = binary_header([1, 1, 8, 8], size)
        with pytest.raises(oip.BadRequest):
            doc, rest = oip.parse(header + tail, str(len(header)))
            oip.request(doc, rest, IMAGE, max_rows=4)
    with pytest.raises(oip.BadRequest, match="Inference-Header-Content-Length"):
        oip.parse(b"{}", "999")


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(min_value=-2, max_value=9), min_size=0, max_size=6),
    datatype=st.sampled_from(sorted(oip.DATATYPES) + ["FP8", "", "fp32"]),
    values=st.integers(min_value=0, max_value=200),
)
def test_any_malformed_request_is_a_bad_request_never_a_crash(
    shape: list[int], datatype: str, values: int
) -> None:
    body = _json_body([0.5] * values, shape, datatype=datatype)
    try:
        doc, tail = oip.parse(body, None)
        req = oip.request(doc, tail, IMAGE, max_rows=4)
    except oip.BadRequest as exc:
        assert str(exc)
        return
    assert req.inputs["image"].shape[1:] == (1, 8, 8) and 1 <= req.rows <= 4


def test_path_variants_are_one_route() -> None:
    assert {
        normalise_path(p)
        for p in (
            "/v2/models/digits/infer",
            "//v2//models/digits/infer/",
            "/v2/models//digits/infer//",
        )
    } == {"/v2/models/digits/infer"}


def test_non_string_datatype_and_odd_output_parameters_are_bad_requests() -> None:
    for body in (
        b'{"inputs": [{"name": "image", "datatype": [], "shape": [1,1,8,8], "data": []}]}',
        _json_body([0.0] * 64, [1, 1, 8, 8])[:-1] + b', "outputs": [{"name": "y", '
        b'"parameters": [1]}]}',
    ):
        with pytest.raises(oip.BadRequest):
            doc, tail = oip.parse(body, None)
            oip.request(doc, tail, IMAGE, max_rows=4)
