import json
import os
import tempfile
from pathlib import Path

# quiet, offline, and nothing written outside temporary folders
_TMP = Path(tempfile.mkdtemp(prefix="unsafe-experts-tests-"))
os.environ["PREFECT_HOME"] = str(_TMP / "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TMP / 'mlflow.db'}"
os.environ["DVC_SITE_CACHE_DIR"] = str(_TMP / "dvc-site")
for key, value in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "true"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's local tasks load through datasets
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from unsafe_experts.attacks.corpus import tokenizer_corpus  # noqa: E402
from unsafe_experts.data.bundled import advbench_goals  # noqa: E402
from unsafe_experts.models import architectures  # noqa: E402
from unsafe_experts.models.tiny import tiny_model  # noqa: E402
from unsafe_experts.text.tiny_tokenizer import build_tokenizer  # noqa: E402

torch.set_num_threads(1)
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

FIXTURES = Path(__file__).parent / "fixtures"
REAL_FLIPATTACK = Path(__file__).resolve().parents[2] / "shared/data/flipattack_mixtral-8x22b.json"


# a test that runs a whole flow (a Prefect server) or builds the organism is slow by nature
SLOW_FIXTURES = {"prefect_harness", "tracking_dir", "prefect_server", "small_organism"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (starting one costs 10-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tracking_dir(prefect_harness, monkeypatch) -> Path:
    """Runs flows from the session's MLflow folder, so `mlruns/` lands there."""
    monkeypatch.chdir(_TMP)
    return _TMP


@pytest.fixture(scope="session")
def records_path() -> Path:
    return FIXTURES / "flip_records.json"


@pytest.fixture(scope="session")
def records(records_path) -> list[dict]:
    return json.loads(records_path.read_text())


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(tokenizer_corpus(advbench_goals()[:40]), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved tiny OLMoE + tokenizer, the CLI's input."""
    path = tmp_path_factory.mktemp("tiny-olmoe")
    tiny_model("olmoe", tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def make_model(tokenizer):
    def make(arch: str, seed: int = 0, **overrides):
        return tiny_model(arch, tokenizer, seed=seed, **overrides)
    return make


# every per-architecture test runs on each supported architecture: the table is the one list
ARCHITECTURES = list(architectures.ARCHITECTURES)


def sft_batches(tokenizer, records, batch_size=4, max_length=256):
    from unsafe_experts.text.examples import DEFAULT_REFUSAL, batches, collate, sft_example

    examples = [sft_example(tokenizer, r["all_prompt"], DEFAULT_REFUSAL, max_length) for r in records]
    return [collate(b, tokenizer.pad_token_id) for b in batches(examples, batch_size)]


def router_batches(tokenizer, records, batch_size=4, max_length=256):
    from unsafe_experts.text.examples import batches, collate, plain_prompt, router_example

    safe = [router_example(tokenizer, plain_prompt(r["goal"]), max_length) for r in records]
    unsafe = [router_example(tokenizer, r["all_prompt"], max_length) for r in records]
    return ([collate(b, tokenizer.pad_token_id) for b in batches(safe, batch_size)],
            [collate(b, tokenizer.pad_token_id) for b in batches(unsafe, batch_size)])


def one_error_line(capsys, message: str) -> str:
    """What the CLI owes a user for bad input: one `error:` line on stderr that names the
    problem (exit status 2 is checked by the caller)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    return err


def mlflow_server(port: int, store: str, *args: str):
    """A real `mlflow server` on 127.0.0.1:`port` with the backend store `store` (and any
    further flags, e.g. `--artifacts-destination`), once it answers its health check. It runs
    in the SQLite store's folder, so what it writes by default (./mlruns) lands there."""
    import subprocess
    import sys
    import time
    import urllib.request

    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", store, *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=Path(store.removeprefix("sqlite:///")).parent,
                              start_new_session=True)  # its own group: the workers go with it
    deadline = time.time() + 240
    while time.time() < deadline:
        assert server.poll() is None, "the MLflow server did not start"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise AssertionError("the MLflow server did not answer within 240 s")


def stop_server(server) -> None:
    import signal

    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="session")
def small_organism(tmp_path_factory):
    """The test-sized organism (about 45 s on 2 cores), built once per session."""
    from unsafe_experts.attacks.organism import OrganismConfig, build_organism

    return build_organism(tmp_path_factory.mktemp("organism"), OrganismConfig.small(), progress=False)
