"""Data parallelism and FSDP on CPU: 2 gloo processes select the same experts and reach the
same weights as 1 process on the same global batch."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import sft_batches
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from unsafe_experts.models.architectures import moe_layers
from unsafe_experts.models.sharding import shard_model
from unsafe_experts.selection.score_pass import score_pass
from unsafe_experts.selection.scoring import top_k
from unsafe_experts.training.phases import masked_sft

pytestmark = pytest.mark.slow  # torchrun and gloo process groups


def surgery_step(model_dir, records, sharded=False, memory="exact"):
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if sharded:
        model = shard_model(model, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    layers = moe_layers(model)
    batches = sft_batches(tokenizer, records, batch_size=4)
    logs = {}
    scores = score_pass(model, layers, batches, lambda k, v: logs.setdefault(k, v), progress=False,
                        streamed=memory == "streamed", offload=memory == "offload")
    selection = top_k(scores, 3, layers)
    masked_sft(model, layers, batches, selection, lr=1e-2, weight_decay=0.1, epochs=2,
               log=lambda k, v: logs.setdefault(k, v), progress=False)
    weights = {n: (p.full_tensor() if sharded else p).detach().contiguous()
               for n, p in model.named_parameters()}
    return scores, selection, weights, logs


def _rank(rank, store, model_dir, records, out, sharded, memory):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        scores, selection, weights, logs = surgery_step(model_dir, records, sharded, memory)
        save_file({"scores": scores, **weights}, f"{out}/rank{rank}.safetensors")
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"selection": selection, "logs": logs}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sharded, memory", [(False, "exact"), (True, "streamed"), (True, "offload")],
                         ids=["data-parallel-exact", "fsdp-streamed", "fsdp-offload"])
def test_two_gloo_processes_match_one_process(sharded, memory, tiny_dir, records, tmp_path):
    """Plain data parallelism with exact scoring; FSDP (half of every layer's experts on each
    rank) with streamed scoring, whose per-batch magnitudes are taken after fully_shard has
    summed the ranks' gradients, and with offloaded exact scoring (each rank's rows summed in
    host memory, then gathered); gradients cut to the selected rows in the SFT."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tiny_dir), records[:12], str(tmp_path),
                          sharded, memory), nprocs=2, join=True)
    scores, selection, weights, logs = surgery_step(str(tiny_dir), records[:12], memory=memory)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    meta = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in (0, 1):
        assert [tuple(x) for x in meta[r]["selection"]] == selection  # identical top-k on every rank
        torch.testing.assert_close(ranks[r]["scores"], scores, rtol=1e-5, atol=1e-10)
        for name, value in weights.items():
            # Adam divides by sqrt(v): summation-order rounding shows up as ~1e-5 of a 1e-2 step
            torch.testing.assert_close(ranks[r][name], value, rtol=1e-4, atol=2e-5, msg=name)
        for kind in ("score", "sft"):
            assert meta[r]["logs"][kind] == pytest.approx(logs[kind], rel=1e-5)
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in weights)  # ranks never drift apart


def test_pipeline_under_torchrun_with_fsdp_matches_one_process(tiny_dir, records_path, tmp_path,
                                                               tracking_dir):
    """`torchrun ... unsafe_experts train --sharding fsdp`: rank 0 runs the Prefect flow and
    MLflow tracking, rank 1 the same engine phases; each holds half of every layer's experts.
    It selects the same experts and reaches the same weights as one process with the whole
    model."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from cli.main import main

    def args(out):
        return ["train", "--model_name", str(tiny_dir), "--dataset_path", str(records_path),
                "--output_dir", str(out), "--num_rounds", "2", "--top_k_experts", "3",
                "--batch_size", "4", "--max_samples", "12", "--expert_lr", "1e-2",
                "--router_lr", "1e-3", "--quiet"]

    assert main([*args(tmp_path / "single"), "--engine_only"]) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "cli",
         *args(tmp_path / "fsdp"), "--sharding", "fsdp", "--metrics", str(tmp_path / "metrics.json")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert done.returncode == 0, done.stderr[-3000:]
    single = json.loads((tmp_path / "single" / "training_metadata.json").read_text())
    fsdp = json.loads((tmp_path / "fsdp" / "training_metadata.json").read_text())
    assert fsdp["status"] == "completed" and fsdp["locality"]["ok"]
    assert ([r["experts"] for r in fsdp["identified_experts_per_round"].values()]
            == [r["experts"] for r in single["identified_experts_per_round"].values()])
    a = load_file(tmp_path / "single" / "final_model" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "final_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # six Adam steps of 1e-2: rounding differences stay under 1% of one step
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)
    # rank 0 wrote the rounds' deltas from the gathered weights: round 2 is the final model
    from unsafe_experts.artefacts.checkpoints import materialize

    materialized = load_file(materialize(tmp_path / "fsdp", 2, tmp_path / "m") / "model.safetensors")
    assert all(torch.equal(materialized[name], b[name]) for name in b)
    # tracked once, by rank 0
    run_id = done.stdout.split("MLflow run ")[1].split(";")[0]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["sharding"] == "fsdp"
    assert run.data.tags["world_size"] == "2" and fsdp["model"]["world_size"] == 2
    assert run.data.metrics["run/rounds"] == 2  # tracking/metric_names.py
    assert json.loads((tmp_path / "metrics.json").read_text())["locality_ok"] == 1
    assert done.stdout.count("MLflow run ") == 1
