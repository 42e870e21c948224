"""Delta checkpoints: round_N/ holds the trained experts' rows and the routers; materialized,
it is the full checkpoint a full save of that round would have written, tensor for tensor."""
import json
import shutil

import pytest
import torch
from conftest import one_error_line
from safetensors.torch import load_file, save_file

from cli.main import main
from unsafe_experts.artefacts.atomic import save_checkpoint_atomic
from unsafe_experts.artefacts.checkpoints import checkpoint_tokenizer, load_checkpoint, materialize
from unsafe_experts.artefacts.deltas import MANIFEST, WEIGHTS, DeltaError, weights_digest
from unsafe_experts.artefacts.locality import weight_changes
from unsafe_experts.config import TrainConfig
from unsafe_experts.records import file_digest
from unsafe_experts.surgery import Surgery, run_surgery


def base_dir(tmp_path, make_model, tokenizer, family):
    path = tmp_path / f"base-{family}"
    make_model(family).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def config(base, records_path, out, **overrides):
    values = dict(model_name=str(base), dataset_path=str(records_path), output_dir=str(out),
                  num_rounds=2, top_k_experts=2, batch_size=4, max_samples=8, expert_lr=1e-3,
                  router_lr=1e-3, retention="none")
    return TrainConfig(**{**values, **overrides})


def run_with_full_saves(cfg, reference):
    """The surgery, with a full save of the live model beside each round's delta: what a round
    checkpoint was before deltas."""
    surgery = Surgery(cfg, progress=False, echo=lambda *a: None)
    surgery.start()
    for r in range(1, cfg.num_rounds + 1):
        surgery.identify(r)
        surgery.repair(r)
        surgery.align(r)
        surgery.checkpoint(r)
        save_checkpoint_atomic(surgery.model, surgery.tokenizer, reference / f"round_{r}")
    return surgery.finish()


def same_checkpoint(a, b):
    """Every file of the two directories, byte for byte, and the weights tensor for tensor."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    ours, theirs = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_a_materialized_round_is_what_a_full_save_wrote(family, make_model, tokenizer, records_path,
                                                        tmp_path):
    base = base_dir(tmp_path, make_model, tokenizer, family)
    out, reference = tmp_path / "out", tmp_path / "full"
    reference.mkdir()
    meta = run_with_full_saves(config(base, records_path, out), reference)
    digest = weights_digest(base)
    for r in (1, 2):
        delta = out / f"round_{r}"
        assert sorted(p.name for p in delta.iterdir()) == [MANIFEST, WEIGHTS]
        manifest = json.loads((delta / MANIFEST).read_text())
        experts = meta["identified_experts_per_round"][str(r)]["experts"]
        assert manifest["base"]["sha256"] == digest and manifest["base"]["path"] == str(base.resolve())
        assert manifest["previous"] == (None if r == 1 else f"round_{r - 1}")
        assert sorted(manifest["experts"]) == sorted(experts) and manifest["routers"]
        # only the selected experts' rows, and the routers whole
        stored = load_file(delta / WEIGHTS)
        for name, rows in manifest["tensors"].items():
            if rows is None:
                assert ".gate." in name
            else:
                layer = int(name.split(".layers.")[1].split(".")[0])
                assert rows == sorted(e for l, e in experts if l == layer)
                assert stored[name].shape[0] == len(rows)
        materialize(out, r, tmp_path / f"materialized_{r}")
        same_checkpoint(tmp_path / f"materialized_{r}", reference / f"round_{r}")
        size = sum(p.stat().st_size for p in delta.iterdir())
        assert size < sum(p.stat().st_size for p in (reference / f"round_{r}").iterdir()) / 2
    # final_model/ is full by default, and the same as the last round
    same_checkpoint(tmp_path / "materialized_2",
                    _without_card(out / "final_model", tmp_path / "final-without-card"))


def _without_card(path, copy):
    shutil.copytree(path, copy)
    (copy / "README.md").unlink()
    return copy


def test_a_delta_final_model_loads_and_passes_the_locality_check(tiny_dir, records_path, tmp_path):
    out = tmp_path / "out"
    meta = run_surgery(config(tiny_dir, records_path, out, final_checkpoint="delta"), progress=False,
                       echo=lambda *a: None)
    final = out / "final_model"
    assert sorted(p.name for p in final.iterdir()) == ["README.md", MANIFEST, WEIGHTS]
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["previous"] is None and manifest["round"] == "final"  # one delta on the base
    model, _ = load_checkpoint(final)
    last, _ = load_checkpoint(out / "round_2")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.state_dict().values()))
    selected = {tuple(x) for r in meta["identified_experts_per_round"].values() for x in r["experts"]}
    changes = weight_changes(tiny_dir, final)
    assert {tuple(x) for x in changes["experts"]} <= selected and changes["experts"]
    assert changes["routers"] == [0, 1] and changes["other"] == []
    assert "materialize" in (final / "README.md").read_text()


def test_the_cli_loads_a_round_through_its_deltas(tiny_dir, records_path, tmp_path):
    from cli.loading import load_model

    out = tmp_path / "out"
    run_surgery(config(tiny_dir, records_path, out), progress=False, echo=lambda *a: None)
    model, tokenizer = load_model(str(out / "round_2"))
    final = load_file(out / "final_model" / "model.safetensors")
    materialize(out, 2, tmp_path / "m")
    full = load_file(tmp_path / "m" / "model.safetensors")
    assert final.keys() == full.keys() and all(torch.equal(final[k], full[k]) for k in final)
    ours = dict(model.named_parameters())
    start, _ = load_checkpoint(tiny_dir)
    changed = [n for n, p in start.named_parameters() if not torch.equal(p, ours[n])]
    assert changed and all(".experts." in n or ".gate." in n for n in changed)
    assert tokenizer.pad_token_id is not None
    alone = checkpoint_tokenizer(out / "round_2")  # what a served model's prompts are rendered with
    assert alone("a test").input_ids == tokenizer("a test").input_ids


def test_materialize_refuses_a_missing_round_or_another_base(tiny_dir, records_path, tmp_path, capsys):
    out = tmp_path / "out"
    run_surgery(config(tiny_dir, records_path, out, num_rounds=1), progress=False, echo=lambda *a: None)
    capsys.readouterr()
    target = tmp_path / "full"
    assert main(["materialize", str(out), "--round", "3", "--out", str(target)]) == 2
    one_error_line(capsys, "no round 3 on disk (rounds: 1)")
    assert not target.exists()

    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir, other)
    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert main(["materialize", str(out), "--round", "1", "--out", str(target), "--base", str(other)]) == 2
    one_error_line(capsys, f"base {other} has weights digest")
    assert not target.exists()

    target.mkdir()
    (target / "mine.txt").write_text("kept")
    assert main(["materialize", str(out), "--round", "1", "--out", str(target)]) == 2
    one_error_line(capsys, "exists and is not an empty directory")
    assert [p.name for p in target.iterdir()] == ["mine.txt"]

    assert main(["materialize", str(out), "--round", "1", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def interrupted_after_round_1(cfg):
    """The state a run killed after its first round leaves (round_1/ and the metadata)."""
    interrupted = Surgery(cfg, progress=False, echo=lambda *a: None)
    interrupted.start()
    for phase in (interrupted.identify, interrupted.repair, interrupted.align, interrupted.checkpoint):
        phase(1)
    interrupted.fail(KeyboardInterrupt())


def change_config(base):
    """The same weights under another architecture setting (rope_theta)."""
    config_file = base / "config.json"
    values = json.loads(config_file.read_text())
    values["rope_theta"] = values.get("rope_theta", 10000.0) * 2
    config_file.write_text(json.dumps(values, indent=2))


@pytest.mark.parametrize("change, message", [("weights", "were trained on a base with digest"),
                                             ("config", "config.json digest")])
def test_a_resumed_run_refuses_a_base_whose_weights_changed(change, message, tiny_dir, records_path, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    cfg = config(base, records_path, tmp_path / "out")
    interrupted_after_round_1(cfg)
    if change == "weights":
        weights = load_file(base / "model.safetensors")
        name = next(iter(weights))
        weights[name] = weights[name] * 2
        save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    else:  # the architecture the rounds' weights are loaded into, weights untouched
        change_config(base)
    with pytest.raises(DeltaError, match=message):
        run_surgery(cfg, progress=False, echo=lambda *a: None)


def test_materialize_refuses_a_base_whose_config_changed(tiny_dir, records_path, tmp_path, capsys):
    out = tmp_path / "out"
    run_surgery(config(tiny_dir, records_path, out, num_rounds=1), progress=False, echo=lambda *a: None)
    manifest = json.loads((out / "round_1" / MANIFEST).read_text())
    assert manifest["base"]["config_sha256"] == file_digest(tiny_dir / "config.json")
    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir, other)
    change_config(other)
    capsys.readouterr()
    target = tmp_path / "full"
    assert main(["materialize", str(out), "--round", "1", "--out", str(target), "--base", str(other)]) == 2
    one_error_line(capsys, f"base {other} has config.json digest")
    assert not target.exists()
    # a manifest written before the config digest existed: its base's config is not checked
    for delta in (out / "round_1", out / "final_model"):
        if (delta / MANIFEST).is_file():
            old = json.loads((delta / MANIFEST).read_text())
            del old["base"]["config_sha256"]
            (delta / MANIFEST).write_text(json.dumps(old))
    assert main(["materialize", str(out), "--round", "1", "--out", str(target), "--base", str(other)]) == 0


def damage_data(file, at=-4):
    """Flips bytes in the tensor data of a safetensors file, leaving its header intact."""
    data = bytearray(file.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    assert len(data) + at >= header  # inside the data, past the header
    data[at:] = bytes(0xFF for _ in data[at:])  # a float32's bytes all 0xFF: NaN
    file.write_bytes(bytes(data))


def test_a_delta_whose_bytes_changed_is_refused_naming_both_digests(tiny_dir, records_path, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    cfg = config(base, records_path, tmp_path / "out")
    interrupted_after_round_1(cfg)
    delta = tmp_path / "out" / "round_1"
    manifest = json.loads((delta / MANIFEST).read_text())
    assert manifest["delta_sha256"] == file_digest(delta / WEIGHTS)
    load_checkpoint(delta)  # sound: loads
    damage_data(delta / WEIGHTS)
    found = file_digest(delta / WEIGHTS)
    # every way a delta is applied: loading (evaluate, attack), materialize, resume, locality
    with pytest.raises(DeltaError, match=f"{delta / WEIGHTS}: sha256 {found}, but {MANIFEST} "
                                         f"records {manifest['delta_sha256']}"):
        load_checkpoint(delta)
    capsys.readouterr()
    target = tmp_path / "full"
    assert main(["materialize", str(tmp_path / "out"), "--round", "1", "--out", str(target)]) == 2
    one_error_line(capsys, f"{delta / WEIGHTS}: sha256 {found}")
    assert not target.exists()
    with pytest.raises(DeltaError, match="was changed or damaged after it was written"):
        run_surgery(cfg, progress=False, echo=lambda *a: None)
    with pytest.raises(DeltaError, match="was changed or damaged"):
        weight_changes(base, delta)


def test_an_old_delta_without_a_digest_loads_and_a_bad_header_is_named(tiny_dir, records_path, tmp_path, capsys):
    out = tmp_path / "out"
    run_surgery(config(tiny_dir, records_path, out, num_rounds=1), progress=False, echo=lambda *a: None)
    delta = out / "round_1"
    sound, _ = load_checkpoint(delta)
    old = json.loads((delta / MANIFEST).read_text())
    del old["delta_sha256"], old["base"]["config_sha256"]  # as written before the digests
    (delta / MANIFEST).write_text(json.dumps(old))
    model, _ = load_checkpoint(delta)  # accepted, unverified
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), sound.state_dict().values()))
    data = bytearray((delta / WEIGHTS).read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")  # a header length past the end of the file
    (delta / WEIGHTS).write_bytes(bytes(data))
    capsys.readouterr()
    target = tmp_path / "full"
    assert main(["materialize", str(out), "--round", "1", "--out", str(target)]) == 2
    one_error_line(capsys, f"{delta / WEIGHTS}: not a readable safetensors file")
    assert not target.exists()


def test_per_batch_rounds_store_every_expert_a_batch_trained(tiny_dir, records_path, tmp_path):
    out = tmp_path / "out"
    meta = run_surgery(config(tiny_dir, records_path, out, num_rounds=1, score_mode="per_batch",
                              top_k_experts=1), progress=False, echo=lambda *a: None)
    picked = {tuple(x) for p in meta["identified_experts_per_round"]["1"]["per_batch_experts"] for x in p}
    manifest = json.loads((out / "round_1" / MANIFEST).read_text())
    assert {tuple(x) for x in manifest["experts"]} == picked
    materialize(out, 1, tmp_path / "m")
    full = load_file(tmp_path / "m" / "model.safetensors")
    final = load_file(out / "final_model" / "model.safetensors")
    assert all(torch.equal(final[k], full[k]) for k in final)
