"""A run's lifecycle around its output directory: the lock, a finished run asked again, and
which rank speaks."""
import shutil

import pytest
from conftest import one_error_line

from cli.main import main
from unsafe_experts import surgery as surgery_module
from unsafe_experts.artefacts.atomic import LOCK_NAME, DirectoryLock
from unsafe_experts.config import TrainConfig

SMALL = dict(num_rounds=1, top_k_experts=2, batch_size=4, max_samples=4, seed=0)


def flags(tiny_dir, records_path, out):
    return ["train", "--model_name", str(tiny_dir), "--dataset_path", str(records_path),
            "--output_dir", str(out), "--num_rounds", "1", "--top_k_experts", "2",
            "--batch_size", "4", "--max_samples", "4", "--quiet", "--engine_only"]


def test_a_failure_after_the_lock_is_taken_releases_it(tiny_dir, records_path, tmp_path, monkeypatch):
    def load_fails(*args):
        raise MemoryError("no room for the weights")  # after the inputs check and the lock
    monkeypatch.setattr(surgery_module, "_load_model", load_fails)
    out = tmp_path / "out"
    cfg = TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path), output_dir=str(out), **SMALL)
    with pytest.raises(MemoryError):
        surgery_module.run_surgery(cfg, progress=False)
    assert not (out / LOCK_NAME).exists()
    DirectoryLock(out).acquire().release()  # a long-lived process could take it again


def test_a_lock_left_alone_in_the_directory_is_not_content(tiny_dir, records_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("12345")  # a run killed right after taking the lock
    assert main(flags(tiny_dir, records_path, out)) == 0
    assert (out / "final_model").is_dir()


def test_the_same_command_after_a_finished_run_has_nothing_to_do(tiny_dir, records_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(flags(tiny_dir, records_path, out)) == 0
    stamp = (out / "training_metadata.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(flags(tiny_dir, records_path, out)) == 0
    assert "already completed" in capsys.readouterr().out
    assert (out / "training_metadata.json").stat().st_mtime_ns == stamp
    # other parameters on the same directory still need --overwrite
    assert main([*flags(tiny_dir, records_path, out), "--seed", "7"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("rank, speaks", [(0, True), (1, False)])
def test_only_rank_zero_speaks(tiny_dir, records_path, tmp_path, monkeypatch, rank, speaks):
    monkeypatch.setattr(surgery_module, "join_process_group", lambda device: rank)
    said = []
    cfg = TrainConfig(model_name=str(tiny_dir), dataset_path=str(records_path),
                      output_dir=str(tmp_path / "out"), max_length=64, **SMALL)  # prompts truncated
    surgery_module.Surgery(cfg, progress=False, echo=said.append)
    assert bool(said) == speaks


def test_pickle_weights_are_refused_before_anything_is_written(tiny_dir, records_path, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    weights = pickled / "model.safetensors"
    torch.save(load_file(weights), pickled / "pytorch_model.bin")
    weights.unlink()
    out = tmp_path / "out"
    assert main(flags(pickled, records_path, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model_name:") and "pytorch_model.bin" in err and "safetensors" in err
    assert not out.exists()


def _broken_copy(tiny_dir, tmp_path, how):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights, config = model / "model.safetensors", model / "config.json"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "bad header":
        weights.write_bytes(b"\xff" * 64)
    elif how == "unknown model_type":
        config.write_text(config.read_text().replace('"olmoe"', '"no_such_moe"'))
    elif how == "no model_type":
        config.write_text(config.read_text().replace('"model_type": "olmoe",', ""))
    elif how == "a file":
        return weights
    return model


@pytest.mark.parametrize("how, message", [
    ("truncated weights", "is not a readable safetensors file"),
    ("bad header", "is not a readable safetensors file"),
    ("unknown model_type", "no_such_moe"),
    ("no model_type", "model_name: "),
    ("a file", "is a file; expected a checkpoint directory"),
])
def test_broken_checkpoints_are_one_error_line_and_leave_nothing(tiny_dir, records_path, tmp_path,
                                                                 capsys, how, message):
    out = tmp_path / "out"
    assert main(flags(_broken_copy(tiny_dir, tmp_path, how), records_path, out)) == 2
    one_error_line(capsys, message)
    assert not out.exists()


def test_cuda_without_a_gpu_is_one_error_line(tiny_dir, records_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main([*flags(tiny_dir, records_path, tmp_path / "out"), "--device", "cuda"]) == 2
    assert "device: cuda asked for, but torch sees no CUDA GPU" in capsys.readouterr().err


def test_overwrite_with_fewer_rounds_clears_the_old_rounds(tiny_dir, records_path, tmp_path):
    out = tmp_path / "out"
    assert main([*flags(tiny_dir, records_path, out), "--num_rounds", "2"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / ".training_metadata.json.abc.tmp").write_text("{")
    assert main([*flags(tiny_dir, records_path, out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "expert_gradients.pkl", "final_model", "notes.txt", "round_1", "training_metadata.json"]


def test_a_full_disk_during_a_checkpoint_is_one_error_line(tiny_dir, records_path, tmp_path, capsys,
                                                           monkeypatch):
    import errno
    import json

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(surgery_module, "write_delta", full)  # round 1's checkpoint
    out = tmp_path / "out"
    assert main(flags(tiny_dir, records_path, out)) == 2
    one_error_line(capsys, "No space left on device")
    assert json.loads((out / "training_metadata.json").read_text())["status"] == "failed"
    assert not (out / LOCK_NAME).exists()


def test_a_kill_after_the_final_rename_resumes_and_leaves_no_temporary_file(tiny_dir, records_path,
                                                                           tmp_path):
    import json

    out = tmp_path / "out"
    assert main(flags(tiny_dir, records_path, out)) == 0
    # the state a kill between final_model's rename and the last metadata write leaves: every
    # round recorded, status still running, the metadata's temporary file cut short beside it
    meta_path = out / "training_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "status": "running"}))
    (out / ".training_metadata.json.x1y2.tmp").write_text("{")
    assert main(flags(tiny_dir, records_path, out)) == 0  # the same command again
    meta = json.loads(meta_path.read_text())
    assert meta["status"] == "completed" and meta["resumed"][0]["after_round"] == 1
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert (out / "final_model" / "model.safetensors").is_file()
