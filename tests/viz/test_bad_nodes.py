"""``analyze`` and ``export-html`` on a circuit naming nodes the model lacks: one-line errors
(exit status 2) naming circuit.json and the node, never a traceback from the forward pass."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest

from sparsecircuits import cli


def _one_line_error(args: list[str], monkeypatch, capsys) -> str:
    """Run the console entry point, which turns input errors into ``error: ...`` and status 2."""
    monkeypatch.setattr(sys, "argv", ["sparsecircuits", *args])
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # keep pytest's logging
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _edit(directory, change) -> str:
    """Apply ``change(circuit)`` to directory/circuit.json; returns the edited node's id."""
    path = directory / "circuit.json"
    data = json.loads(path.read_text())
    node_id = change(data)
    path.write_text(json.dumps(data))
    return node_id


def _mlp_neuron_past_the_model(data) -> str:
    # The recorded d_mlp is raised too, so the file agrees with itself and only the model
    # (whose weights hash still matches) shows the node is not there.
    size = data["model"]["d_mlp"]
    data["model"]["d_mlp"] = 10 * size
    node = next(n for n in data["nodes"] if n["loc"] == "mlp_neuron")
    node["index"] = size + 5
    return node["id"]


def _layer_past_the_model(data) -> str:
    data["model"]["n_layer"] = 8
    data["nodes"][0]["layer"] = 7
    return data["nodes"][0]["id"]


def _embed_node(data) -> str:
    data["nodes"][0].update(id="embed.99999", layer=-1, loc="embed", index=99999)
    return "embed.99999"


@pytest.mark.parametrize("command", ["analyze", "export-html"])
@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_mlp_neuron_past_the_model, r"index \d+ is outside \[0, \d+\) at 0\.mlp_neuron"),
        (_layer_past_the_model, r"layer 7 is outside the model's layers 0\.\.1"),
        (_embed_node, r"no embedding nodes \(mask_embed is false\)"),
    ],
)
def test_node_missing_from_the_model_is_a_one_line_error(
    copy_circuit, circuit_model_dir, monkeypatch, capsys, command, change, why
):
    d = copy_circuit(with_analysis=False)
    node_id = _edit(d, change)
    line = _one_line_error(
        [command, str(d), "--model", str(circuit_model_dir)], monkeypatch, capsys
    )
    assert f"{d / 'circuit.json'}: node {node_id} " in line, line
    assert "does not exist in model" in line
    assert re.search(why, line), line
    assert not (d / "analysis.json").exists() and not (d / "circuit.html").exists()


@pytest.mark.parametrize("command", ["analyze", "export-html"])
def test_out_of_range_index_is_a_one_line_error(
    copy_circuit, circuit_model_dir, monkeypatch, capsys, command
):
    # Dims recorded truthfully: whichever check sees it first (the circuit file's or the
    # model's), the answer is one line naming the file and the bad index.
    d = copy_circuit(with_analysis=False)
    _edit(d, lambda data: data["nodes"][0].update(index=99999))
    line = _one_line_error(
        [command, str(d), "--model", str(circuit_model_dir)], monkeypatch, capsys
    )
    assert "circuit.json" in line and "99999" in line, line
