"""The served LABELS output and the request's top_k: what every client sends is parsed here, in the server."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clfpipe.contract.probabilities import label_parameters, requested_top_k, served_labels, tag_labels, top_k_labels

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.dictionaries(st.sampled_from(["top_k", "other", ""]), JSON_VALUES, max_size=3).map(json.dumps),
                 JSON_VALUES.map(json.dumps), st.text(max_size=40)))
def test_any_request_parameters_give_a_k_of_at_least_one_or_one_short_valueerror(text):
    try:
        k = requested_top_k(text, default=3)
    except ValueError as exc:  # the message goes back to the client: one line, not the client's whole value
        assert "\n" not in str(exc) and len(str(exc)) < 200
        return
    sent = json.loads(text or "{}")
    assert isinstance(k, int) and k >= 1
    assert k == (sent["top_k"] if "top_k" in sent else 3)


def test_top_k_is_taken_from_its_key_or_the_default():
    assert requested_top_k("", 3) == 3 and requested_top_k('{"other": 1}', 3) == 3
    assert requested_top_k('{"top_k": 1}', 3) == 1 and requested_top_k('{"k": 7}', 3, key="k") == 7
    for refused in ('{"top_k": 0}', '{"top_k": true}', '{"top_k": 2.0}', '{"top_k": "2"}', "[1]", "not json"):
        with pytest.raises(ValueError):
            requested_top_k(refused, 3)
    with pytest.raises(ValueError, match=r"^top_k: expected a positive integer, got 'xxxx.*\.\.\. \(10002 characters\)$"):
        requested_top_k(json.dumps({"top_k": "x" * 10_000}), 3)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(-3, 10), st.integers(0, 2**32 - 1))
def test_labels_are_the_k_most_probable_classes_in_order_and_parse_back(n, classes, k, seed):
    names = [f"class:{i}" for i in range(classes)]  # a colon in a name: clients split at the last one
    probs = np.random.default_rng(seed).dirichlet(np.ones(classes), size=n).astype(np.float32)
    labels = top_k_labels(probs, names, k)
    assert labels.shape == (n, max(1, min(k, classes)))
    for row, entries in zip(probs, labels):
        parsed = [entry.decode().rsplit(":", 1) for entry in entries]
        assert [names.index(name) for name, _ in parsed] == list(np.argsort(-row, kind="stable")[: len(entries)])
        np.testing.assert_allclose([float(p) for _, p in parsed], np.sort(row)[::-1][: len(entries)], atol=5e-7)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(-2, 8), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_multi_label_labels_are_the_tags_above_the_threshold_in_order_padded_to_one_width(n, classes, k, threshold, seed):
    names = [f"tag:{i}" for i in range(classes)]
    probs = np.random.default_rng(seed).random((n, classes)).astype(np.float32)
    labels = tag_labels(probs, names, threshold, k)
    expected = [[j for j in np.argsort(-row, kind="stable") if row[j] > threshold][: max(1, k)] for row in probs]
    assert labels.shape == (n, max(1, *(len(e) for e in expected)))
    for row, entries, want in zip(probs, labels, expected):
        named = [entry.decode().rsplit(":", 1) for entry in entries if entry]
        assert [names.index(name) for name, _ in named] == want  # the claimed tags, most probable first, at most k
        assert list(entries[len(want):]) == [b""] * (len(entries) - len(want))  # then padding only
        np.testing.assert_allclose([float(v) for _, v in named], row[want], atol=5e-7)


def test_a_multi_label_model_names_every_tag_unless_the_request_says_fewer():
    classes = ["cloud", "road", "water"]
    single = {"top_k": {"string_value": "2"}}
    multi = {**single, "threshold": {"string_value": "0.2"}}
    assert label_parameters(single, classes) == (2, None) and label_parameters(multi, classes) == (3, 0.2)
    probs = np.array([[0.9, 0.3, 0.1], [0.1, 0.15, 0.2]], np.float32)  # the second claims nothing: 0.2 is not above 0.2
    assert served_labels(probs, classes, 3, 0.2).tolist() == [[b"cloud:0.900000", b"road:0.300000"], [b"", b""]]
    assert served_labels(probs, classes, 1, 0.2).tolist() == [[b"cloud:0.900000"], [b""]]
    assert served_labels(probs, classes, 2, None).tolist() == [[b"cloud:0.900000", b"road:0.300000"],
                                                               [b"water:0.200000", b"road:0.150000"]]
