"""Pack files and compressed manifests (SPEC.md 3.2, 3.3.1): a run's objects live in one pack per
step block and its manifests are zstd frames; old runs (loose objects, JSON manifests) still
read. Each hostile pack or manifest is paired with the honest one.

    PYTHONPATH=src python -m pytest -q -p no:cacheprovider tests/test_packs.py

The unit tests build packs from a few tiny tensors (no training, under a second); one test
records a tiny run (two step blocks, a few seconds) and reads it in both layouts.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
import zstandard

from aftune.core.packs import ENTRY, INDEX_MAGIC, PACK_MAGIC, read_index
from aftune.core.store import ObjectStore, TensorRef
from aftune.errors import CommitmentMismatch, RecordError
from aftune.training.manifest import StepBlockManifest, manifest_paths, read_manifest

TENSORS = {f"t{i}": torch.arange(i * 10, i * 10 + 6, dtype=torch.float32).reshape(2, 3) for i in range(4)}


def _packed(tmp_path):
    """A store with the four tensors in one pack: (store, refs, pack path, index path)."""
    store = ObjectStore(tmp_path / "objects", "blake3")
    refs = {n: TensorRef.of(n, t, "blake3") for n, t in TENSORS.items()}
    pack = store.begin_pack("000000")
    for n, t in TENSORS.items():
        store.put(refs[n], t, pack)
    store.put(refs["t0"], TENSORS["t0"], pack)  # a repeat is stored once
    path = pack.finish()
    return store, refs, path, path.with_suffix(".idx")


def _rows(index: bytes) -> list[list]:
    n = struct.unpack_from("<Q", index, 8)[0]
    return [list(ENTRY.unpack_from(index, 16 + i * ENTRY.size)) for i in range(n)]


def _index(rows) -> bytes:
    return INDEX_MAGIC + struct.pack("<Q", len(rows)) + b"".join(ENTRY.pack(*r) for r in rows)


def _fresh(store: ObjectStore) -> ObjectStore:
    return ObjectStore(store.root, store.algorithm)


def test_a_pack_holds_every_object_once_and_reads_back_checked(tmp_path):
    store, refs, pack, index = _packed(tmp_path)
    assert sorted(p.name for p in (tmp_path / "objects").rglob("*")) == sorted(["pack", pack.name, index.name])
    assert pack.read_bytes()[:8] == PACK_MAGIC and len(_rows(index.read_bytes())) == 4
    reader = _fresh(store)
    for n, ref in refs.items():
        assert reader.has(ref.digest) and torch.equal(reader.get(ref, "test"), TENSORS[n])
        assert store.has(ref.digest)  # the writing store knows its finished pack at once
    assert ObjectStore(tmp_path / "none", "blake3").begin_pack("000001").finish() is None  # empty: no file


def test_a_loose_object_is_read_before_the_pack(tmp_path):
    store, refs, pack, _ = _packed(tmp_path)
    store.put(refs["t1"], TENSORS["t1"])  # loose copy
    assert _fresh(store).locate(refs["t1"].digest) == store.path(refs["t1"].digest)
    store.path(refs["t1"].digest).write_bytes(b"not zstd")  # the loose copy is what is read: and checked
    with pytest.raises(RecordError, match="not valid zstd"):
        _fresh(store).get(refs["t1"], "test")


@pytest.mark.parametrize("attack", ["offset into the previous entry", "gap", "past the end", "truncated pack",
                                    "trailing bytes", "repeated digest", "unsorted digests", "wrong size",
                                    "no entries", "bad magic", "missing pack", "bad pack magic", "empty entry"])
def test_a_hostile_pack_is_a_record_error_naming_it(tmp_path, attack):
    store, refs, pack, index = _packed(tmp_path)
    rows = _rows(index.read_bytes())
    by_offset = sorted(rows, key=lambda r: r[1])
    data = pack.read_bytes()
    if attack == "offset into the previous entry":
        by_offset[1][1] -= 3
    elif attack == "gap":
        by_offset[1][1] += 3
    elif attack == "past the end":
        by_offset[-1][2] += 1000
    elif attack == "truncated pack":
        pack.write_bytes(data[:-5])
    elif attack == "trailing bytes":
        pack.write_bytes(data + b"x")
    elif attack == "repeated digest":
        rows[1][0] = rows[0][0]
    elif attack == "unsorted digests":
        rows[0], rows[1] = rows[1], rows[0]
    elif attack == "empty entry":
        by_offset[-1][2] = 0
    elif attack == "missing pack":
        pack.unlink()
    elif attack == "bad pack magic":
        pack.write_bytes(b"NOTAPACK" + data[8:])
    if attack == "wrong size":
        index.write_bytes(_index(rows) + b"\0")
    elif attack == "no entries":
        index.write_bytes(_index([]))
    elif attack == "bad magic":
        index.write_bytes(b"X" + _index(rows)[1:])
    elif attack not in ("truncated pack", "trailing bytes", "missing pack", "bad pack magic"):
        index.write_bytes(_index(rows))
    with pytest.raises(RecordError, match=pack.name) as info:
        _fresh(store).get(refs["t2"], "test")
    assert not isinstance(info.value, CommitmentMismatch)
    with pytest.raises(RecordError, match=pack.name):
        read_index(index)


def test_swapped_entries_never_give_a_wrong_tensor(tmp_path):
    """An index whose entries tile the pack but point each digest at another object's bytes."""
    store, refs, pack, index = _packed(tmp_path)
    rows = _rows(index.read_bytes())
    (rows[0][1], rows[0][2]), (rows[1][1], rows[1][2]) = (rows[1][1], rows[1][2]), (rows[0][1], rows[0][2])
    index.write_bytes(_index(rows))
    reader = _fresh(store)
    by_digest = {r.digest: n for n, r in refs.items()}
    with pytest.raises(CommitmentMismatch, match=r"holds \['t"):
        reader.get(refs[by_digest[rows[0][0]]], "step block 0, layer block 1")


def test_aftune_check_names_a_damaged_pack_and_the_object_in_it(tmp_path):
    from aftune.training.check import CheckReport, CommittedRows, check_objects

    store, refs, pack, index = _packed(tmp_path)
    rows = CommittedRows()
    for n, ref in refs.items():
        rows.add(ref, "manifests/000000.json.zst", f"state/{n}", required=True)
    report = CheckReport(str(tmp_path), "run")
    check_objects(report, _fresh(store), rows)
    assert report.status == "intact" and report.objects == 4, report.problems
    entry = min(_rows(index.read_bytes()), key=lambda r: r[1])
    data = bytearray(pack.read_bytes())
    data[entry[1] + entry[2] - 6] ^= 0xFF  # inside the first object's frame
    pack.write_bytes(bytes(data))
    report = CheckReport(str(tmp_path), "run")
    check_objects(report, _fresh(store), rows)
    assert report.status == "damaged" and [p.path for p in report.problems] == [f"objects/pack/{pack.name}"]
    assert entry[0].hex()[:16] in report.problems[0].reason
    index.write_bytes(index.read_bytes()[:-1])  # a damaged index: every object it held is missing
    report = CheckReport(str(tmp_path), "run")
    check_objects(report, _fresh(store), rows)
    kinds = sorted((p.kind, p.path.split("/")[-1][-4:]) for p in report.problems)
    assert ("damaged", ".idx") in kinds and sum(k == "missing" for k, _ in kinds) == 4, kinds
    (tmp_path / "objects" / "pack" / ".tmp-000001.1.2.pack").write_bytes(b"AFTPACK1")  # interrupted write
    report = CheckReport(str(tmp_path), "run")
    check_objects(report, _fresh(store), CommittedRows())
    assert any(p.kind == "unreferenced" and "interrupted" in p.reason for p in report.problems)


def test_unpack_makes_loose_objects(tmp_path):
    store, refs, pack, index = _packed(tmp_path)
    assert store.unpack() == 4 and not pack.exists() and not index.exists()
    reader = _fresh(store)
    assert all(reader.locate(r.digest) == reader.path(r.digest) for r in refs.values())
    assert torch.equal(reader.get(refs["t3"], "test"), TENSORS["t3"])


# --- manifests --------------------------------------------------------------------------------------

def _manifest() -> StepBlockManifest:
    ref = TensorRef.of("loss", torch.tensor(1.5), "blake3")
    w = TensorRef.of("w", torch.ones(2, 2), "blake3")
    return StepBlockManifest(0, 0, 2, {"step/00000000/micro/0000/loss": ref}, [{"state/w": w}])


def test_a_v3_manifest_is_the_v2_rows_in_one_zstd_frame(tmp_path):
    m = _manifest()
    path = m.write(tmp_path)
    assert path.name == "000000.json.zst"
    doc = json.loads(zstandard.ZstdDecompressor().decompress(path.read_bytes()))
    assert doc == m.to_json() and doc["format"] == "aftune.manifest.v3"
    assert zstandard.get_frame_parameters(path.read_bytes()).content_size == len(json.dumps(doc, separators=(",", ":")))
    back = read_manifest(tmp_path, 0, 1)
    assert back.merkle_root("blake3") == m.merkle_root("blake3")


def test_a_v2_manifest_still_reads_and_both_files_are_refused(tmp_path):
    m = _manifest()
    zst, plain = manifest_paths(tmp_path, 0)
    plain.write_text(json.dumps(m.to_json("aftune.manifest.v2")))
    assert read_manifest(tmp_path, 0, 1).merkle_root("blake3") == m.merkle_root("blake3")  # an old run
    m.write(tmp_path)  # a resumed run rewrites an unsigned v2 manifest as v3: one file remains
    assert zst.exists() and not plain.exists()
    plain.write_text(json.dumps(m.to_json("aftune.manifest.v2")))
    with pytest.raises(RecordError, match="both exist"):
        read_manifest(tmp_path, 0, 1)


@pytest.mark.parametrize("attack", ["v2 inside zstd", "v3 as plain JSON", "no content size", "truncated",
                                    "not zstd", "frame declares more"])
def test_a_hostile_v3_manifest_is_a_record_error(tmp_path, attack):
    m = _manifest()
    zst, plain = manifest_paths(tmp_path, 0)
    text = json.dumps(m.to_json(), separators=(",", ":")).encode()
    good = m.encode()
    if attack == "v2 inside zstd":
        zst.write_bytes(zstandard.ZstdCompressor().compress(json.dumps(m.to_json("aftune.manifest.v2")).encode()))
    elif attack == "v3 as plain JSON":
        plain.write_bytes(text)
    elif attack == "no content size":
        zst.write_bytes(zstandard.ZstdCompressor(write_content_size=False).compress(text))
    elif attack == "truncated":
        zst.write_bytes(good[:-6])
    elif attack == "not zstd":
        zst.write_bytes(text)
    elif attack == "frame declares more":
        zst.write_bytes(zstandard.ZstdCompressor().compress(text + b" " * 10)[:-8])
    with pytest.raises(RecordError) as info:
        read_manifest(tmp_path, 0, 1)
    assert not isinstance(info.value, CommitmentMismatch)


# --- a recorded run, in both layouts ---------------------------------------------------------------

def test_a_run_is_packed_and_its_old_layout_still_verifies(record, tmp_path):
    """A recorded run holds packs and v3 manifests only; the same record in the old layout (loose
    objects, v2 JSON manifests) checks and verifies as before, and so does a run in the new one."""
    import shutil

    from aftune.training.check import check_run
    from aftune.training.run import RunRecord
    from conftest import verify_all

    run_dir, key = record("llama", steps=4, steps_per_block=2)
    files = [p.relative_to(run_dir).as_posix() for p in sorted((run_dir / "objects").rglob("*")) if p.is_file()]
    assert files and all(f.startswith("objects/pack/") for f in files), files
    assert sorted(p.name for p in (run_dir / "manifests").iterdir()) == [f"00000{s}.json.zst" for s in range(3)]
    assert check_run(run_dir, key).status == "intact"
    assert verify_all(run_dir, key).verdict == "PASS"

    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    rec = RunRecord.open(old, key)
    for s in range(3):  # what aftune 0.2 wrote
        zst, plain = manifest_paths(old / "manifests", s)
        plain.write_text(json.dumps(rec.manifest(s).to_json("aftune.manifest.v2")))
        zst.unlink()
    assert rec.store.unpack() > 0 and not any((old / "objects" / "pack").iterdir())
    shutil.copy(run_dir.with_name(run_dir.name + ".agreement.json"), old.with_name("old.agreement.json"))
    assert check_run(old, key).status == "intact"
    assert verify_all(old, key).verdict == "PASS"
