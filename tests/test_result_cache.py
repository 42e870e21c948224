"""The content-addressed cache that lets many runs on one model share its retention answers
and its evaluation before surgery (unsafe_experts/artefacts/result_cache.py)."""
import json

from unsafe_experts.artefacts.result_cache import cached, model_digest


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
    assert cached(tmp_path, "kind", key, compute(6)) == {"answers": [6]}
    assert json.loads(entry.read_text())["value"] == {"answers": [6]}


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
