import json

import pytest
from conftest import REAL_FLIPATTACK
from fixtures.make_fixtures import fixture_records

from unsafe_experts.records import DatasetError, load_records, select_records
from unsafe_experts.text.examples import (
    DEFAULT_REFUSAL,
    IGNORE,
    ExampleError,
    collate,
    plain_prompt,
    router_example,
    sft_example,
)


def response_text(tokenizer, example):
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


def test_fixture_is_what_the_project_code_builds(records):
    assert records == fixture_records()


def test_labels_cover_only_the_response(tokenizer, records):
    ex = sft_example(tokenizer, records[0]["all_prompt"], DEFAULT_REFUSAL, max_length=512)
    assert not ex.truncated
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
    assert all(t == IGNORE for t in ex.labels[:first])
    assert ex.labels[first:] == ex.input_ids[first:]
    assert response_text(tokenizer, ex) == DEFAULT_REFUSAL + "<|im_end|>\n"
    assert tokenizer.decode(ex.input_ids[:first]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("side", ["middle", "left"])
def test_long_prompt_is_cut_and_response_kept(tokenizer, records, side):
    full = sft_example(tokenizer, records[0]["all_prompt"], DEFAULT_REFUSAL, max_length=2048)
    ex = sft_example(tokenizer, records[0]["all_prompt"], DEFAULT_REFUSAL, max_length=64, truncation=side)
    assert ex.truncated and len(ex.input_ids) == 64
    assert response_text(tokenizer, ex) == DEFAULT_REFUSAL + "<|im_end|>\n"
    prompt_len = sum(t == IGNORE for t in ex.labels)
    full_prompt = [t for t, l in zip(full.input_ids, full.labels) if l == IGNORE]
    if side == "middle":  # the start of the template and the end of the request survive
        head = prompt_len // 2
        assert ex.input_ids[:head] == full_prompt[:head]
        assert ex.input_ids[head:prompt_len] == full_prompt[-(prompt_len - head):]
    else:
        assert ex.input_ids[:prompt_len] == full_prompt[-prompt_len:]


def test_response_longer_than_max_length_is_an_error(tokenizer, records):
    with pytest.raises(ExampleError, match="record 7.*max_length=16"):
        sft_example(tokenizer, records[0]["all_prompt"], DEFAULT_REFUSAL * 4, max_length=16, index=7)


def test_router_mask_skips_template_and_padding(tokenizer):
    ex = router_example(tokenizer, plain_prompt("Write a poem"), max_length=128)
    kept = tokenizer.decode([t for t, m in zip(ex.input_ids, ex.content_mask) if m])
    assert kept == "You are a helpful assistant.Write a poem"
    short = router_example(tokenizer, plain_prompt("Hi"), max_length=128)
    batch = collate([ex, short], tokenizer.pad_token_id)
    assert batch["content_mask"][1, len(short.input_ids):].sum() == 0
    assert batch["attention_mask"][1].sum() == len(short.input_ids)
    assert (batch["labels"] == IGNORE).all()


def test_filtering_sampling_and_seeded_shuffle(records):
    kept = select_records(records, None, seed=1)
    assert len(kept) == 18 and all(r["judge_success_gpt4"] == 1 for r in kept)
    assert len(select_records(records, None, seed=1, require_judge_success=False)) == 20
    assert select_records(records, 5, seed=1) == kept[:5] == select_records(records, 5, seed=1)
    assert select_records(records, 5, seed=2) != kept[:5]
    failed = [dict(r, judge_success_gpt4=0) for r in records]
    with pytest.raises(DatasetError, match="no records left after filtering"):
        select_records(failed, 10, seed=0)


@pytest.mark.parametrize("record, message", [
    ({"goal": "x"}, "record 1: field `all_prompt`"),
    ({"goal": "", "all_prompt": [{"role": "user", "content": "hi"}]}, "record 1: field `goal`"),
    ({"goal": "x", "all_prompt": [{"role": "bot", "content": "hi"}]}, "message 0: role must be one of"),
    ({"goal": "x", "all_prompt": [{"role": "system", "content": "hi"}]}, "no user message"),
    ({"goal": "x", "all_prompt": [{"role": "user", "content": 3}]}, "message 0: `content` must be"),
    ({"goal": "x", "all_prompt": [{"role": "user", "content": "a"}], "judge_success_gpt4": 7},
     "judge_success_gpt4"),
])
def test_bad_records_name_index_and_field(tmp_path, records, record, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([records[0], record]))
    with pytest.raises(DatasetError, match=message):
        load_records(path)


def test_jsonl_and_invalid_json(tmp_path, records):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n")
    assert load_records(jsonl) == records[:3]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"goal": "x",\n  "all_prompt": [}]')
    with pytest.raises(DatasetError, match="broken.json: not valid JSON \\(line 2, column"):
        load_records(broken)


@pytest.mark.skipif(not REAL_FLIPATTACK.exists(), reason="the real FlipAttack file is not here")
def test_real_flipattack_file_loads_and_tokenizes(tokenizer):
    loaded = load_records(REAL_FLIPATTACK)
    kept = select_records(loaded, 128, seed=0)
    assert len(loaded) == 520 and len(kept) == 128
    examples = [sft_example(tokenizer, r["all_prompt"], DEFAULT_REFUSAL, 512, index=i)
                for i, r in enumerate(kept[:16])]
    assert all(response_text(tokenizer, e) == DEFAULT_REFUSAL + "<|im_end|>\n" for e in examples)
    assert all(len(e.input_ids) <= 512 for e in examples)


def test_length_grouped_batches_keep_every_example_once_and_cut_the_padding():
    import random

    from unsafe_experts.text.examples import Example, batches, length_grouped_batches

    lengths = random.Random(1).choices([20, 40, 120, 400], k=300)
    examples = [Example(list(range(n)), list(range(n)), False, []) for n in lengths]
    grouped = length_grouped_batches(examples, 16, random.Random(0))
    assert sorted(id(e) for b in grouped for e in b) == sorted(id(e) for e in examples)
    assert len(grouped) == len(batches(examples, 16)) and all(len(b) <= 16 for b in grouped)

    def padded(bs):
        return sum(len(b) * max(len(e.input_ids) for e in b) for b in bs)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    assert padded(grouped) < 0.7 * padded(batches(shuffled, 16))
    # seeded: the same rng state gives the same epoch, another gives another
    again = length_grouped_batches(examples, 16, random.Random(0))
    assert [[id(e) for e in b] for b in again] == [[id(e) for e in b] for b in grouped]
    other = length_grouped_batches(examples, 16, random.Random(1))
    assert [[id(e) for e in b] for b in other] != [[id(e) for e in b] for b in grouped]
