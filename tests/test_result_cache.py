"""The content-addressed cache that lets many runs on one model share its retention answers
and its evaluation before surgery (unsafe_experts/artefacts/result_cache.py)."""
import json

import pytest

from unsafe_experts.artefacts.result_cache import CacheWarning, cached, model_digest, value_digest
from unsafe_experts.config import TrainConfig
from unsafe_experts.evaluation.evaluate import is_evaluation_result
from unsafe_experts.surgery import run_surgery


def test_a_hit_returns_what_the_miss_stored_and_a_new_key_computes(tmp_path):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return {"answers": [value]}
        return run

    key = {"model": "abc", "limit": 4}
    assert cached(tmp_path, "kind", key, compute(1)) == {"answers": [1]}
    assert cached(tmp_path, "kind", dict(key), compute(2)) == {"answers": [1]}  # hit: not computed
    assert cached(tmp_path, "kind", {**key, "limit": 5}, compute(3)) == {"answers": [3]}
    assert calls == [1, 3]
    assert cached(None, "kind", key, compute(4)) == {"answers": [4]}  # no cache: always computed
    assert cached(tmp_path, "kind", None, compute(5)) == {"answers": [5]}  # no key (a hub id)
    (entry,) = [p for p in (tmp_path / "kind").glob("*.json")
                if json.loads(p.read_text())["value"] == {"answers": [1]}]
    entry.write_text("{not json")  # damaged: recomputed and replaced
    with pytest.warns(CacheWarning, match=f"cache entry {entry}: unreadable"):
        assert cached(tmp_path, "kind", key, compute(6)) == {"answers": [6]}
    assert json.loads(entry.read_text())["value"] == {"answers": [6]}


def _entry(cache, kind):
    (path,) = (cache / kind).glob("*.json")
    return path


@pytest.mark.parametrize("damage, why", [
    (lambda e: {**e, "value": {"answers": ["edited"]}}, "does not match its sha256"),
    (lambda e: [e["value"]], "not a cache entry"),  # wrong shape: was a TypeError traceback
    (lambda e: {"value": e["value"]}, "not a cache entry"),
    (lambda e: {**e, "key": {**e["key"], "model": "other"}}, "stored under another key"),
    (lambda e: {**e, "value": {"answers": "x"}, "sha256": value_digest({"answers": "x"})},
     "not of the expected shape"),  # consistent digest, but not what a caller can use
])
def test_an_edited_or_misshapen_entry_is_recomputed_with_a_warning_naming_it(tmp_path, damage, why):
    key = {"model": "abc"}
    calls = []

    def compute():
        calls.append(1)
        return {"answers": ["a", "b"]}

    def valid(value):
        return isinstance(value, dict) and isinstance(value.get("answers"), list)

    used = {}
    assert cached(tmp_path, "kind", key, compute, valid, used) == {"answers": ["a", "b"]}
    entry = _entry(tmp_path, "kind")
    assert used == {"kind": {"entry": str(entry), "hit": False}}
    stored = json.loads(entry.read_text())
    assert stored["sha256"] == value_digest(stored["value"])
    entry.write_text(json.dumps(damage(stored)))
    used = {}
    with pytest.warns(CacheWarning, match=f"cache entry {entry}: .*{why}"):
        assert cached(tmp_path, "kind", key, compute, valid, used) == {"answers": ["a", "b"]}
    assert len(calls) == 2 and used["kind"]["hit"] is False
    assert json.loads(entry.read_text()) == stored  # overwritten with the computed value
    used = {}
    assert cached(tmp_path, "kind", key, compute, valid, used) == {"answers": ["a", "b"]}
    assert len(calls) == 2 and used["kind"]["hit"] is True  # sound again: a hit


def test_the_evaluation_shape_check():
    good = {"suite": "s", "metrics": {"asr": {"value": 0.5, "n": 4, "ci95": [0, 1]}},
            "samples": [{"set": "a"}], "left_out": []}
    assert is_evaluation_result(good)
    for bad in ([], {**good, "metrics": 1}, {**good, "metrics": {"asr": {"value": "0.5", "n": 4}}},
                {**good, "samples": None}, {k: v for k, v in good.items() if k != "left_out"}):
        assert not is_evaluation_result(bad)


def test_a_run_records_its_cache_entry_and_an_edited_one_never_changes_its_answers(tiny_dir, records_path,
                                                                                    tmp_path):
    retention = tmp_path / "retention.json"
    retention.write_text(json.dumps([[{"role": "user", "content": f"Name a colour, {i}."}] for i in range(4)]))
    cache = tmp_path / "cache"

    def run(out):
        cfg = TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path), output_dir=str(tmp_path / out),
                          num_rounds=1, top_k_experts=2, batch_size=4, max_samples=4, retention="plain",
                          retention_path=str(retention), retention_samples=4, retention_max_new_tokens=4,
                          cache_dir=str(cache), skip_router_training=True)
        meta = run_surgery(cfg, progress=False, echo=lambda *a: None)
        return meta["cache"]["retention_answers"], json.loads((tmp_path / out / "retention_answers.json").read_text())

    first, answers = run("a")
    entry = _entry(cache, "retention_answers")
    assert first == {"entry": str(entry), "hit": False}
    assert run("b") == ({"entry": str(entry), "hit": True}, answers)
    stored = json.loads(entry.read_text())
    entry.write_text(json.dumps({**stored, "value": ["I cannot help with that."] * len(stored["value"])}))
    with pytest.warns(CacheWarning, match=f"cache entry {entry}"):
        again = run("c")
    assert again == ({"entry": str(entry), "hit": False}, answers)  # recomputed: the same answers
    assert json.loads(entry.read_text()) == stored


def test_the_model_digest_covers_every_file_and_skips_hub_ids(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "tokenizer.json").write_text("{}")
    first = model_digest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    second = model_digest(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"x": 1}')
    assert len({first, second, model_digest(tmp_path)}) == 3
    assert model_digest("allenai/OLMoE-1B-7B-0125-Instruct") is None
