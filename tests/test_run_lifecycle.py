"""A run's lifecycle around its output directory: the lock, a finished run asked again, and
which rank speaks."""
import os
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
    (out / "notes.tmp").write_text("mine too")  # a .tmp of the user's: was removed
    (out / "round_notes").write_text("mine too")  # a round_ name that is no round: was removed
    (out / ".git").mkdir()
    (out / ".training_metadata.json.abc.tmp").write_text("{")
    (out / ".round_2.old").mkdir()
    assert main([*flags(tiny_dir, records_path, out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".git", "expert_gradients.pkl", "final_model", "notes.tmp", "notes.txt", "round_1", "round_notes",
        "training_metadata.json"]


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


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    from unsafe_experts.errors import ConfigError

    out, precious = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    precious.write_text("the user's file")
    (out / LOCK_NAME).symlink_to(precious)  # the PID used to be written through it
    with pytest.raises(ConfigError, match=f"the lock file {out / LOCK_NAME} is a symbolic link"):
        DirectoryLock(out).acquire()
    assert precious.read_text() == "the user's file"
    (out / LOCK_NAME).unlink()
    os.link(precious, out / LOCK_NAME)  # a hard link: truncating it would empty the user's file
    with pytest.raises(ConfigError, match="is not a plain file of its own"):
        DirectoryLock(out).acquire()
    assert precious.read_text() == "the user's file"


def test_the_lock_is_never_held_twice_when_its_file_goes_between_open_and_flock(tmp_path, monkeypatch):
    """B opens the lock file while A holds it; A releases (removes the file, unlocks); B's flock
    then succeeds on the removed file. C, arriving after, creates a new file and locks that: B
    must not count as holding the lock, or both run at once."""
    import fcntl
    import threading
    import types

    from unsafe_experts.artefacts import atomic
    from unsafe_experts.errors import OutputDirBusyError

    a = DirectoryLock(tmp_path).acquire()
    b_opened, a_released = threading.Event(), threading.Event()

    def flock(fd, operation):
        if threading.current_thread().name == "B" and not a_released.is_set():
            b_opened.set()  # B has the file open and is about to lock it
            a_released.wait(10)
        return fcntl.flock(fd, operation)

    monkeypatch.setattr(atomic, "fcntl", types.SimpleNamespace(
        flock=flock, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, LOCK_UN=fcntl.LOCK_UN))
    got = {}

    def take():
        try:
            got["B"] = DirectoryLock(tmp_path).acquire()
        except OutputDirBusyError as e:
            got["B"] = e

    b = threading.Thread(target=take, name="B")
    b.start()
    assert b_opened.wait(10)
    a.release()
    a_released.set()
    b.join(10)
    holders = [x for x in [got["B"]] if isinstance(x, DirectoryLock)]
    try:
        holders.append(DirectoryLock(tmp_path).acquire())  # C
    except OutputDirBusyError:
        pass
    assert len(holders) == 1, "the lock was held twice"
    holders[0].release()


def _contend(directory, rounds, overlaps):
    from unsafe_experts.errors import OutputDirBusyError

    for _ in range(rounds):
        try:
            lock = DirectoryLock(directory).acquire()
        except OutputDirBusyError:
            continue
        try:  # exclusive while held: a second holder would find the marker there
            os.close(os.open(os.path.join(directory, "held"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            with overlaps.get_lock():
                overlaps.value += 1
        else:
            os.unlink(os.path.join(directory, "held"))
        lock.release()


def test_two_processes_contending_for_the_lock_never_hold_it_together(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    overlaps = context.Value("i", 0)
    workers = [context.Process(target=_contend, args=(str(tmp_path), 400, overlaps)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert overlaps.value == 0
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("again", [[], ["--overwrite"]])
def test_resuming_removes_only_the_runs_own_temporary_entries(tiny_dir, records_path, tmp_path, again):
    import json

    out = tmp_path / "out"
    assert main([*flags(tiny_dir, records_path, out), "--num_rounds", "2"]) == 0
    meta_path = out / "training_metadata.json"
    meta = json.loads(meta_path.read_text())  # a run that failed after round 1
    meta["identified_experts_per_round"].pop("2")
    meta_path.write_text(json.dumps({**meta, "status": "failed"}))
    shutil.rmtree(out / "round_2")
    shutil.rmtree(out / "final_model")
    users = {".git": "dir", ".venv": "dir", ".notes": "file", "notes.tmp": "file", ".draft.tmp": "file",
             ".round_notes": "file"}
    leftovers = {".round_2.k3j4h5g6": "dir", ".final_model.old": "dir", ".final_model.a1b2c3d4": "dir",
                 ".training_metadata.json.x1y2.tmp": "file", ".retention_answers.json.abcdefgh.tmp": "file"}
    for name, kind in {**users, **leftovers}.items():
        if kind == "dir":
            (out / name).mkdir()
            (out / name / "inside").write_text("x")
        else:
            (out / name).write_text("x")
    assert main([*flags(tiny_dir, records_path, out), "--num_rounds", "2", *again]) == 0
    meta = json.loads(meta_path.read_text())
    assert meta["status"] == "completed" and meta["resumed"][0]["after_round"] == 1
    names = {p.name for p in out.iterdir()}
    assert set(users) <= names, "a user's entry was removed"
    assert not set(leftovers) & names
    assert (out / ".git" / "inside").read_text() == "x"


def test_only_the_names_the_atomic_writers_make_count_as_temporary():
    from unsafe_experts.artefacts.atomic import is_temporary_of

    def ours(name):
        return name in {"round_2", "final_model", "training_metadata.json"}

    for name in (".round_2.k3j4h5g6", ".round_2.old", ".final_model.a1b2c3d4",
                 ".training_metadata.json.x1y2.tmp", ".training_metadata.json.abcd_123.tmp"):
        assert is_temporary_of(name, ours), name
    for name in (".git", ".venv", ".notes", LOCK_NAME, ".round_2.backup", ".draft.tmp", "round_2",
                 ".round_3.k3j4h5g6", ".training_metadata.json", "training_metadata.json.x1y2.tmp"):
        assert not is_temporary_of(name, ours), name


def test_a_full_disk_inside_safetensors_is_one_error_line(tiny_dir, records_path, tmp_path, capsys,
                                                          monkeypatch):
    """A real full disk reaches us as safetensors' own SafetensorError, not an OSError: it was
    a traceback, with the metadata left `running`."""
    import json

    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # the message safetensors gives on ENOSPC
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')
    monkeypatch.setattr(safetensors.torch, "save_file", full)  # round 1's delta
    out = tmp_path / "out"
    assert main(flags(tiny_dir, records_path, out)) == 2
    one_error_line(capsys, "No space left on device (writing safetensors)")
    assert json.loads((out / "training_metadata.json").read_text())["status"] == "failed"
    assert not (out / LOCK_NAME).exists() and not list(out.glob(".round_1.*"))
