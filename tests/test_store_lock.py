"""The local MLflow store's lock (tracking/mlflow_runs.store_lock): two processes that log the same
records file into one experiment at the same moment (the comparison grid's surgeries) both
succeed, and the lock can be re-entered by the thread holding it."""
import multiprocessing
import os
import threading

from tracking import mlflow_runs

RECORDS = [{"goal": f"goal {i}"} for i in range(5)]


def _log_at_once(uri: str, barrier, runs: int, errors) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        ids = [mlflow_runs.start_run("lock-test", f"r{i}", {}, {}) for i in range(runs)]
        for run_id in ids:
            barrier.wait(timeout=60)  # both insert the same dataset in the same instant
            mlflow_runs.log_dataset(run_id, "records.json", RECORDS, "d" * 64)
    except Exception as e:  # the parent reports what failed where
        errors.put(f"{type(e).__name__}: {e}")


def test_two_processes_log_one_dataset_at_once(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with monkeypatch.context() as m:  # the parent opens (migrates) the store first
        m.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow_runs.client()  # as a surgery does (the old lock deadlocked on experiment_id alone)
        mlflow_runs.experiment_id("lock-test")
    spawn = multiprocessing.get_context("spawn")
    barrier, errors = spawn.Barrier(2), spawn.Queue()
    workers = [spawn.Process(target=_log_at_once, args=(uri, barrier, 4, errors)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(180)
    found = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not found, found
    assert [w.exitcode for w in workers] == [0, 0]


def test_the_holder_can_take_the_lock_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = threading.Event()

    def nested():
        with mlflow_runs.store_lock(), mlflow_runs.store_lock():
            done.set()
    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(10)
    assert done.is_set(), "store_lock deadlocked when re-entered"
    # released on exit: another thread takes it at once
    other = threading.Thread(target=nested, daemon=True)
    done.clear()
    other.start()
    other.join(10)
    assert done.is_set()
    assert (tmp_path / ".mlflow.db.lock").is_file()
