"""Atomic writes leave the usual permissions (mkstemp/mkdtemp alone would give 0600/0700)."""

from __future__ import annotations

import os
import stat

from sparsecircuits.fileio import atomic_dir, atomic_write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_dirs_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "d") == 0o755


def test_a_key_given_twice_is_a_one_line_error(tmp_path):
    import pytest

    from sparsecircuits.errors import ConfigError
    from sparsecircuits.fileio import read_json_object

    path = tmp_path / "config.json"
    path.write_text('{"a": {"d_pos_emb": 4, "d_pos_emb": null}}')
    with pytest.raises(ConfigError, match="'d_pos_emb' appears twice") as err:
        read_json_object(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    path.write_text('{"a": 1, "b": {"a": 2}}')  # the same key in two objects is fine
    assert read_json_object(path) == {"a": 1, "b": {"a": 2}}


def test_read_schema_json_errors_are_one_line_checkpoint_errors(tmp_path):
    import pytest

    from sparsecircuits.errors import CheckpointError
    from sparsecircuits.fileio import read_schema_json

    path = tmp_path / "x.json"
    cases = {
        None: "no such thing file",
        "{not json": "not valid JSON",
        '{"schema": "a", "schema": "a"}': "appears twice",
        '{"schema": "b"}': 'not a thing file \\(expected "schema": "a"\\)',
    }
    for text, message in cases.items():
        if text is not None:
            path.write_text(text)
        with pytest.raises(CheckpointError, match=message) as err:
            read_schema_json(path, schema="a", what="thing file")
        assert "\n" not in str(err.value)
    path.write_text('{"schema": "a", "v": 1}')
    assert read_schema_json(path, schema="a", what="thing file") == {"schema_": "a", "v": 1}
