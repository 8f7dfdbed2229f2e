"""The cached tool environments the real-tool tests build (tests/redteam/tool_envs.py)."""

from __future__ import annotations

import shutil

import pytest

from tests.redteam import tool_envs


@pytest.mark.slow
def test_tool_env_is_atomic_and_swept(tmp_path, monkeypatch):
    """A failed creation leaves nothing; a killed one's temp dir, or an env without its ready
    mark, is never taken as ready; a created env's scripts point at its final place."""
    if shutil.which(tool_envs.BASE_PYTHON) is None:
        pytest.skip(f"{tool_envs.BASE_PYTHON} is not on PATH")
    monkeypatch.setattr(tool_envs, "CACHE_ROOT", tmp_path)
    monkeypatch.setattr(tool_envs, "BUILD", True)
    with pytest.raises(tool_envs.ToolEnvError) as err:
        tool_envs.python_tool_env("t", "1", [str(tmp_path / "missing.whl")])
    assert "\n" not in str(err.value) and "pip install" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t-1.lock"]
    (tmp_path / ".t-1.tmp-killed").mkdir()  # as a killed creation leaves it
    (tmp_path / "t-1" / "bin").mkdir(parents=True)  # a half env without the ready mark
    python = tool_envs.python_tool_env("t", "1", ["pip"])  # already there: no download
    assert python == tmp_path / "t-1" / "bin" / "python" and python.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t-1.lock", "t-1"]
    assert tool_envs.creation_info("t", "1")["packages"] == ["pip"]
    assert (tmp_path / "t-1" / "bin" / "pip").read_text().startswith(f"#!{python}")


def test_building_can_be_turned_off(tmp_path, monkeypatch):
    """SPARSECIRCUITS_BUILD_TOOL_ENVS=0: an env not built yet is one line (the tests skip), and
    nothing is written."""
    monkeypatch.setattr(tool_envs, "CACHE_ROOT", tmp_path)
    monkeypatch.setattr(tool_envs, "BUILD", False)
    for make in (tool_envs.python_tool_env, tool_envs.npm_tool_env):
        with pytest.raises(tool_envs.ToolEnvError, match="SPARSECIRCUITS_BUILD_TOOL_ENVS=0"):
            make("t", "1", ["pip"])
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
