"""ema_utils.core.cache: content-addressed artifacts, written atomically."""

import json

import pandas as pd
import pytest

from ema_utils import cache


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("EMA_BUILD_DIR", str(tmp_path / "build"))
    return tmp_path / "build" / "results" / "store"


def test_stable_hash_ignores_dict_order():
    assert cache.stable_hash({"a": 1, "b": [1, 2]}) == cache.stable_hash({"b": [1, 2], "a": 1})
    assert cache.stable_hash({"a": 1}) != cache.stable_hash({"a": 2})


def test_cached_computes_once_per_inputs(store):
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    assert cache.cached("thing", {"n": 1}, compute) == {"x": 1}
    assert cache.cached("thing", {"n": 1}, compute) == {"x": 1}
    assert len(calls) == 1, "same inputs must not recompute"
    assert cache.cached("thing", {"n": 2}, compute) == {"x": 2}, "changed inputs recompute"
    records = sorted(store.glob("thing-*.inputs.json"))
    assert {json.loads(p.read_text())["n"] for p in records} == {1, 2}


def test_cached_table_round_trips(store):
    table = pd.DataFrame({"id": ["a", "b"], "response": ["I'm sorry", "Sure: 1.5"], "v": [0.1, 2.0]})
    first = cache.cached("gen", {"k": 1}, lambda: table, kind="table")
    again = cache.cached("gen", {"k": 1}, lambda: pytest.fail("recomputed"), kind="table")
    pd.testing.assert_frame_equal(first, again)


def test_interrupted_write_leaves_nothing_trusted(store):
    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.cached("x", {}, boom)

    def half(folder):
        (folder / "adapter.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.cached("adapter", {"r": 4}, half, kind="dir")
    assert not [p for p in store.iterdir() if not p.name.startswith(".")] if store.exists() else True
    assert not list(store.glob(".*tmp*")), "temporary files must be cleaned up"
    calls = []
    path = cache.cached("adapter", {"r": 4}, lambda f: calls.append((f / "a").write_text("ok")),
                        kind="dir")
    assert calls and (path / "a").read_text() == "ok" and (path / ".complete").is_file()


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "m.json"
    cache.atomic_write_json(target, {"a": 1})
    cache.atomic_write_json(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
