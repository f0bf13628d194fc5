"""The preset backbones are built whole or not at all (benches and `mint up` build them once)."""

from __future__ import annotations

from mintmesh.model import base_model_info, build_preset, model_ready


def test_build_preset_leaves_a_whole_model_and_no_temporary_files(tmp_path, tiny_model_dir):
    d = tmp_path / "models" / "tiny"
    assert not model_ready(d)
    assert build_preset("tiny", d) == d
    assert model_ready(d)
    # Nothing left beside it, and the same deterministic backbone as init_model writes.
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny"]
    assert base_model_info(d).fingerprint == base_model_info(tiny_model_dir).fingerprint


def test_a_partial_directory_is_not_a_model(tmp_path, tiny_model_dir):
    d = tmp_path / "partial"
    d.mkdir()
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert not model_ready(d)  # no weights: an interrupted copy, not a model
