"""Chunks cut at tensor boundaries (manifest v3): the layout, its wire forms, and where the
packager finds the cuts in a real ONNX graph with external data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud.packaging.layout import tensor_cuts
from shared.blobs import BlobRef, cut_layout, describe_bytes, describe_file
from shared.errors import ContractError, PackagingError
from shared.manifest import FileEntry, SignedManifest
from shared.messages import BlobRequest, FetchRequest
from shared.topics import Topics
from tests.factories import make_manifest

DIGEST = "sha256:" + "a" * 64


def test_cut_layout_splits_each_fixed_chunk_where_a_tensor_starts_or_ends() -> None:
    ends = cut_layout(10_000, 1000, [0, 2500, 2600, 10_000, 12_000])
    assert ends == [1000, 2000, 2500, 2600, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10_000]
    assert cut_layout(3000, 1000, [1000, 2000]) is None, "the fixed layout is left fixed"
    assert cut_layout(0, 1000, [0]) is None


def test_a_cut_blob_ref_is_checked_and_old_refs_keep_their_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    ref = describe_bytes(data, 4096, [100, 5000])
    path = tmp_path / "w"
    path.write_bytes(data)
    assert describe_file(path, 4096, [100, 5000]) == ref
    assert ref.cut and ref.ends is not None
    assert [ref.chunk_offset(i) for i in range(ref.chunk_count)] == [0, *ref.ends[:-1]]
    assert ref.chunk_starting_at(100) == 1 and ref.chunk_starting_at(101) is None
    assert ref.chunk_starting_at(len(data)) is None
    for i in range(ref.chunk_count):
        ref.verify_chunk(i, data[ref.chunk_offset(i) : ref.chunk_offset(i) + ref.chunk_length(i)])

    fixed = describe_bytes(data, 4096)
    assert "ends" not in json.loads(fixed.model_dump_json()), "refs without cuts serialize as before"
    with pytest.raises(ValueError, match="chunk ends"):
        BlobRef(digest=DIGEST, size=10, chunk_size=8, chunks=["0" * 64], ends=[5, 10])
    with pytest.raises(ValueError, match=r"not 1\.\.8 bytes"):
        BlobRef(digest=DIGEST, size=10, chunk_size=8, chunks=["0" * 64] * 2, ends=[1, 10])
    with pytest.raises(ValueError, match="blob's size"):
        BlobRef(digest=DIGEST, size=11, chunk_size=8, chunks=["0" * 64] * 2, ends=[5, 10])


def test_a_manifest_with_cut_chunks_is_v3_so_older_agents_refuse_it_by_schema() -> None:
    cut = describe_bytes(b"x" * 5000, 4096, [1000])
    files = [FileEntry(path="model.onnx.data", role="weights", blob=cut)]
    with pytest.raises(ValueError, match="manifest/v3"):
        make_manifest(files=files)
    m = make_manifest(files=files, schema="autoglm.manifest/v3")
    assert SignedManifest.from_json(SignedManifest(manifest=m).to_json()).manifest == m


def test_blob_requests_name_chunks_or_ranges_and_index_requests_keep_their_bytes() -> None:
    by_index = BlobRequest(digest=DIGEST, chunk_size=1024, chunks=[0, 2])
    wire = FetchRequest(device_id="d", request_id="r", blobs=[by_index]).to_json()
    assert b"ranges" not in wire
    assert FetchRequest.from_json(wire).blobs[0] == by_index
    by_range = BlobRequest(digest=DIGEST, chunk_size=1024, ranges=[(0, 1500), (4096, 10)])
    wire = FetchRequest(device_id="d", request_id="r", blobs=[by_range]).to_json()
    assert b'"chunks"' not in wire and FetchRequest.from_json(wire).blobs[0] == by_range
    for bad in ({}, {"chunks": [0], "ranges": [[0, 1]]}, {"ranges": [[0, 1], [0, 2]]}, {"ranges": [[0, 0]]}):
        doc = {"schema": "autoglm.mqtt/v3", "kind": "fetch", "device_id": "d", "request_id": "r"}
        doc["blobs"] = [{"digest": DIGEST, "chunk_size": 1024, **bad}]
        with pytest.raises(ContractError):
            FetchRequest.from_json(json.dumps(doc))


def test_range_topics_round_trip_and_odd_numbers_are_refused() -> None:
    t = Topics("acme")
    parsed = t.parse(t.blob_range(DIGEST, 123456))
    assert (parsed.channel, parsed.digest, parsed.offset, parsed.chunk) == ("blob", DIGEST, 123456, None)
    assert t.parse(t.blob_chunk(DIGEST, 3)).chunk == 3
    for bad in (
        f"{t.root}/blobs/{DIGEST}/at/²",
        f"{t.root}/blobs/{DIGEST}/²",
        f"{t.root}/blobs/{DIGEST}/at/" + "9" * 5000,
    ):
        with pytest.raises(ContractError):
            t.parse(bad)


def test_the_packager_finds_the_tensor_boundaries_of_an_onnx_graph(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [
        rng.standard_normal(shape).astype(np.float32) for shape in [(300, 200), (64,), (200, 300), (7, 9)]
    ]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"y{i}"]) for i in range(len(weights))]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(weights))]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outputs, initializer=inits))
    onnx.save_model(
        model,
        str(tmp_path / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    cuts = tensor_cuts([tmp_path / "model.onnx"])
    loaded = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    expected = set()
    for t in loaded.graph.initializer:
        info = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        expected |= {info.get("offset", 0), info.get("offset", 0) + info["length"]}
    assert cuts == {"model.onnx.data": sorted(expected)}
    data = tmp_path / "model.onnx.data"
    ref = describe_file(data, 64 * 1024, cuts["model.onnx.data"])
    assert ref.cut and set(expected) - {0} <= set(ref.ends or [])
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(PackagingError, match="cannot read the ONNX graph"):
        tensor_cuts([tmp_path / "bad.onnx"])


def test_numbers_json_cannot_read_are_a_contract_error_not_a_crash() -> None:
    """A 5,000-digit offset makes json.loads raise ValueError: it must not escape the message loop."""
    head = {"schema": "autoglm.mqtt/v3", "kind": "fetch", "device_id": "d", "request_id": "r"}
    doc = json.dumps(head)[:-1] + ',"blobs":[{"digest":"' + DIGEST + '",'
    with pytest.raises(ContractError, match="unreadable JSON"):
        FetchRequest.from_json(doc + '"chunk_size":1024,"ranges":[[' + "9" * 5000 + ",3]]}]}")
    with pytest.raises(ContractError):
        FetchRequest.from_json(doc + '"chunk_size":1024,"ranges":[[' + str(2**63) + ",3]]}]}")


def test_a_blob_ref_has_at_least_one_chunk() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BlobRef(digest=DIGEST, size=0, chunk_size=8, chunks=[])


def test_a_tensor_without_a_length_is_cut_where_its_shape_ends(tmp_path: Path) -> None:
    weights = [np.ones((100, 10), np.float32), np.ones((7,), np.float32)]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"y{i}"]) for i in range(2)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(2)]
    model = helper.make_model(helper.make_graph(nodes, "g", [], outputs, initializer=inits))
    onnx.save_model(
        model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0
    )
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in loaded.graph.initializer:
        keep = [e for e in t.external_data if e.key != "length"]
        del t.external_data[:]
        t.external_data.extend(keep)
    onnx.save_model(loaded, str(tmp_path / "m.onnx"))
    cuts = tensor_cuts([tmp_path / "m.onnx"])["m.data"]
    assert 4000 in cuts and any(c >= 4028 for c in cuts), cuts


def test_runs_pack_the_pieces_of_one_cell_into_one_range() -> None:
    ref = describe_bytes(bytes(10_000), 1000, [2500, 2600, 7000])
    assert ref.ends is not None
    everything = ref.runs(range(ref.chunk_count))
    # One range per 1000-byte cell, as fixed chunks would take: 2000-2500-2600-3000 is one.
    assert everything == [(i * 1000, 1000) for i in range(10)]
    pieces = [ref.chunk_starting_at(a) for a in (2000, 2600, 3000)]
    assert ref.runs(pieces) == [(2000, 500), (2600, 400), (3000, 1000)]  # gaps split runs
