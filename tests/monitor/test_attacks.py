"""The labelled injection set: disjoint splits, balance, determinism, payload offsets, benign
items free of payloads, every item valid Python."""

from __future__ import annotations

import ast
from collections import Counter

import pytest

from sparsecircuits.monitor.attacks import (
    ATTACK,
    BENIGN,
    HOSTS,
    PAYLOADS,
    SLOT,
    detection_set,
    detection_splits,
)


@pytest.fixture(scope="module")
def splits():
    return detection_splits(n_train=600, n_test=601, seed=7)


def test_templates_and_payloads_are_disjoint_between_splits(splits):
    train_lines = {h.line for h in HOSTS["train"]}
    test_lines = {h.line for h in HOSTS["test"]}
    assert not train_lines & test_lines
    assert not set(PAYLOADS["train"]) & set(PAYLOADS["test"])
    for split, items in splits.items():
        assert {it.split for it in items} == {split}
        assert {it.template.split("/")[0] for it in items} == {split}
        assert {it.payload for it in items if it.label == ATTACK} <= set(PAYLOADS[split])
    used = {s: {it.template for it in items} for s, items in splits.items()}
    assert not used["train"] & used["test"]
    assert used["test"] == {f"test/{i}" for i in range(len(HOSTS["test"]))}  # every host used


def test_hosts_are_well_formed():
    for hosts in HOSTS.values():
        for h in hosts:
            assert h.line.count(SLOT) == 1
            assert h.line.split(SLOT)[1].startswith(h.close)
            assert h.closer in "\"')]"


def test_default_size_and_balance():
    items = detection_set("test", 2000)
    assert len(items) == 2000
    assert Counter(it.label for it in items) == {BENIGN: 1000, ATTACK: 1000}
    odd = detection_set("train", 11, seed=3)
    assert Counter(it.label for it in odd) == {BENIGN: 5, ATTACK: 6}
    # Every test host gives both labels, so the host does not tell the label.
    by_host = Counter((it.template, it.label) for it in items)
    assert all(by_host[(f"test/{i}", y)] > 0 for i in range(len(HOSTS["test"])) for y in (0, 1))


def test_determinism_by_seed():
    a = detection_set("test", 50, seed=1)
    assert a == detection_set("test", 50, seed=1)
    assert a != detection_set("test", 50, seed=2)
    assert detection_set("train", 50, seed=1) != a


def test_payload_offsets(splits):
    for items in splits.values():
        for it in items:
            host = HOSTS[it.split][int(it.template.split("/")[1])]
            head, tail = host.line.split(SLOT)
            assert it.text[it.value_start - len(head) : it.value_start] == head
            assert it.text[it.value_end :].startswith(tail)
            if it.label == BENIGN:
                assert it.payload_start == -1 and it.payload == ""
                continue
            assert it.value_start <= it.payload_start
            # The breakout starts with the quote or bracket that the value closes early ...
            assert it.text[it.payload_start] == host.closer
            # ... the payload follows it on the same breakout, and the host's tail still ends
            # the snippet's host line(s).
            rest = it.text[it.payload_start :]
            assert it.payload in rest and rest.index(it.payload) <= len(host.close) + 6
            assert tail in rest[rest.index(it.payload) :]


def test_benign_items_contain_no_payload(splits):
    payloads = PAYLOADS["train"] + PAYLOADS["test"]
    for items in splits.values():
        for it in items:
            if it.label == BENIGN:
                assert not any(p in it.text for p in payloads), it.text
                value = it.text[it.value_start : it.value_end]
                assert "#" not in value and ";" not in value  # the value never breaks out


def test_comments_and_second_statements_are_in_both_labels(splits):
    """Lexical cues appear around benign values as well, at the same rates for both labels."""
    items = splits["test"]
    for label in (BENIGN, ATTACK):
        tails = [it.text[it.value_end :].split("\n")[0] for it in items if it.label == label]
        with_hash = sum("#" in t for t in tails) / len(tails)
        with_semi = sum(";" in t for t in tails) / len(tails)
        assert with_hash > 0.2 and with_semi > 0.15, (label, with_hash, with_semi)


def test_every_item_is_valid_python(splits):
    for items in splits.values():
        for it in items:
            ast.parse(it.text)


def test_the_value_of_a_benign_string_stays_inside_its_literal(splits):
    """Parsing a benign string host finds the (unescaped) value inside a string constant."""
    for it in splits["test"]:
        if it.label == BENIGN and it.kind == "string":
            consts = [n.value for n in ast.walk(ast.parse(it.text))
                      if isinstance(n, ast.Constant) and isinstance(n.value, str)]  # fmt: skip
            value = it.text[it.value_start : it.value_end]
            quote = HOSTS["test"][int(it.template.split("/")[1])].closer
            unescaped = ast.literal_eval(quote + value + quote)
            assert any(unescaped in c for c in consts), it.text


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        detection_set("dev", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        detection_set("test", 1)
