"""The one atomic writer: fsync before rename, manifest last, clear errors, nothing saved damaged."""

import errno
import json

import numpy as np
import pytest

import embforge.atomic as atomic
import embforge.models.saving as saving
from embforge.atomic import MANIFEST, atomic_folder, atomic_write, folder_problem, remove_stale_temporaries
from embforge.data.io import save_json
from embforge.errors import CheckpointError, SaveError
from embforge.models.embedder import Embedder


@pytest.fixture()
def events(monkeypatch):
    """Every fsync and rename of the atomic writer, in order."""
    seen = []
    real_fsync, real_replace = atomic._fsync, atomic.os.replace
    monkeypatch.setattr(atomic, "_fsync", lambda p: (seen.append(("fsync", p.name)), real_fsync(p)))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (seen.append(("rename", b.name)), real_replace(a, b)))
    return seen


def test_a_file_is_fsynced_before_its_rename_and_the_directory_after(tmp_path, events):
    save_json(tmp_path / "out" / "x.json", {"a": 1})
    (kind, tmp_name), rename, fsync_dir = events
    assert kind == "fsync" and tmp_name.startswith(".x.json.tmp-")
    assert rename == ("rename", "x.json") and fsync_dir == ("fsync", "out")
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.json"]


def test_a_folder_gets_every_file_fsynced_then_its_manifest_then_the_rename(tmp_path, events):
    with atomic_folder(tmp_path / "m") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a" * 10)
        (tmp / "b.txt").write_text("b")
    names = [name for _, name in events]
    manifest = names.index(MANIFEST)
    assert set(names[:manifest]) >= {"a.bin", "b.txt", "sub"}  # files and folders, before the manifest
    assert events[manifest + 2 :] == [("rename", "m"), ("fsync", tmp_path.name)]
    files = json.loads((tmp_path / "m" / MANIFEST).read_text())["files"]
    assert sorted(files) == ["b.txt", "sub/a.bin"] and files["sub/a.bin"]["size"] == 10
    assert folder_problem(tmp_path / "m") is None


def test_disk_full_mid_write_keeps_the_previous_file(tmp_path):
    target = save_json(tmp_path / "x.json", {"version": 1})

    def disk_full(tmp):
        tmp.write_text('{"version": 2, "trunc')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SaveError, match=rf"could not save {target}: the disk is full"):
        atomic_write(target, disk_full)
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _texts():
    return ["a cat sat", "the dog ran far away"]


def test_disk_full_while_saving_a_model_folder_keeps_the_saved_one(tiny_embedder, tmp_path, monkeypatch):
    folder = tiny_embedder.save(tmp_path / "model")
    before = Embedder.load(folder).encode(_texts())
    real_layout = saving.write_layout

    def disk_full(tmp, **kwargs):  # the weights are written; the JSON files hit a full disk
        real_layout(tmp, **kwargs)
        (tmp / "modules.json").write_text("[{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving, "write_layout", disk_full)
    with pytest.raises(SaveError, match=rf"could not save {folder}: the disk is full"):
        tiny_embedder.save(folder)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind
    assert folder_problem(folder) is None
    np.testing.assert_array_equal(Embedder.load(folder).encode(_texts()), before)


def test_saving_into_an_unwritable_folder_is_a_clear_error(tiny_embedder, tmp_path, unwritable):
    folder = unwritable(tmp_path / "ro")
    with pytest.raises(SaveError, match=rf"could not save {folder / 'model'}: the folder is not writable"):
        tiny_embedder.save(folder / "model")
    with pytest.raises(SaveError, match=rf"could not save {folder / 'x.json'}: the folder is not writable"):
        save_json(folder / "x.json", {})


def test_saving_over_a_model_in_an_unwritable_folder_leaves_it_intact(tiny_embedder, tmp_path, unwritable):
    folder = tiny_embedder.save(tmp_path / "ro" / "model")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    unwritable(tmp_path / "ro")
    with pytest.raises(SaveError, match="the folder is not writable"):
        tiny_embedder.save(folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"])
def test_a_model_folder_with_a_missing_file_is_a_clear_error(tiny_embedder, tmp_path, missing):
    folder = tiny_embedder.save(tmp_path / "model")
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=rf"model folder {folder} is incomplete .*{missing} is missing"):
        Embedder.load(folder)


def test_a_truncated_weights_file_is_a_clear_error(tiny_embedder, tmp_path):
    folder = tiny_embedder.save(tmp_path / "model")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: {len(data) // 2} bytes, expected {len(data)}"):
        Embedder.load(folder)


def test_leftovers_of_a_killed_writer_are_cleared_or_restored(tmp_path):
    (tmp_path / ".step-00000010.tmp-abc").mkdir()  # killed mid-write
    (tmp_path / ".x.json.tmp-1").write_text("{")
    (tmp_path / ".model.old-42").mkdir()  # killed between moving the old folder aside and the new one in
    (tmp_path / "keep").mkdir()
    assert remove_stale_temporaries(tmp_path) == [".step-00000010.tmp-abc", ".x.json.tmp-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "model"]
