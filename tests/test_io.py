"""Atomic writing (atlas.io): temporaries of a killed writer are swept, nothing else."""

from __future__ import annotations

import pytest

from atlas.io import atomic_path, atomic_write_text, sweep_temporaries


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_sweep_removes_only_killed_temporaries(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / ".model.ab12cd.tmp").mkdir()  # killed inside atomic_path(model)
    (tmp_path / ".model.ab12cd.tmp" / "model").mkdir()
    (tmp_path / ".store.old.4242").mkdir()  # killed between the two renames, store in place
    (tmp_path / "store").mkdir()
    (tmp_path / ".qc.old.77").mkdir()  # qc itself missing: the old copy is all there is, kept
    (tmp_path / ".hidden").write_text("user file")
    (tmp_path / "atlas.h5ad").write_text("x")
    gone = sweep_temporaries(tmp_path)
    assert sorted(gone) == [".model.ab12cd.tmp", ".store.old.4242"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".hidden", ".qc.old.77", "atlas.h5ad", "model", "store"]
    assert sweep_temporaries(tmp_path / "missing") == []
