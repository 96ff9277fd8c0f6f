"""The benchmarks run and print one JSON object with their ratios (tiny sizes: the figures are not checked)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigmodel.data import standard
from conftest import ROOT

needs_fashion = pytest.mark.skipif(
    not standard.has_idx_files(standard.IDX_SETS["fashion_mnist"].local_dirs[0]), reason="Fashion-MNIST not installed"
)


def run_bench(*args: str) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_trainer_overhead_json():
    out = run_bench("benchmarks/trainer_overhead.py", "--steps", "12", "--rounds", "1", "--json")
    assert out["trainer_vs_hand_loop_ratio"] > 0 and out["environment"]["torch"].startswith("2.")


@needs_fashion
def test_quickstart_json():
    out = run_bench("benchmarks/quickstart.py", "--seeds", "0", "--json", "train.epochs=1", "data.limit_train=512")
    assert 0 <= out["test_accuracy_mean"] <= 1 and out["train_time_s_mean"] > 0


@needs_fashion
@pytest.mark.slow
def test_vision_quick_json():
    out = run_bench("benchmarks/vision.py", "--quick", "--json")
    assert out["bf16_channels_last_ratio"] > 0 and out["resnet_trainer_vs_hand_loop_ratio"] > 0
    assert "speedup_vs_seed_ratio" in out


@pytest.mark.slow
def test_text_quick_json():
    out = run_bench("benchmarks/text.py", "--quick", "--seeds", "0", "--json")
    assert 0 < out["tfidf_logreg"]["accuracy"] <= 1
    for name in ("tweets_transformer", "tweets_lstm", "tweets_fasttext"):
        assert out[f"{name}_accuracy_ratio"] > 0 and out[name]["train_time_s"] > 0


@needs_fashion
@pytest.mark.slow
def test_deploy_quick_json():
    out = run_bench("benchmarks/deploy.py", "--quick", "--json")
    for key in ("batching_throughput_ratio", "prune_speedup_ratio", "int8_size_ratio", "int8_speedup_ratio"):
        assert out[key] > 0, key
    assert out["onnx_max_abs_diff"] <= 1e-4


def test_tabular_json():
    out = run_bench("benchmarks/tabular.py", "--seeds", "0", "--json", "train.epochs=2")
    assert 0 < out["mlp_accuracy"] <= 1 and 0 < out["hgb_accuracy"] <= 1 and out["mlp_vs_hgb_accuracy_ratio"] > 0


@pytest.mark.skipif(importlib.util.find_spec("captum") is None, reason="captum is not installed (the explain extra)")
def test_explain_quick_json():
    out = run_bench("benchmarks/explain.py", "--quick", "--json")
    for m in ("saliency", "integrated_gradients", "gradcam", "occlusion", "lime", "kernel_shap"):
        assert out[f"{m}_seconds_per_100"] > 0, m
    assert out["lime_batched_speedup_ratio"] > 0 and 0 <= out["random_deletion_auc"] <= 1
    assert 0 <= out["integrated_gradients_deletion_auc"] <= 1


@pytest.mark.skipif(importlib.util.find_spec("captum") is None, reason="captum is not installed (the explain extra)")
def test_explain_checks_quick_json():
    out = run_bench("benchmarks/explain_checks.py", "--quick", "--json")
    (run,) = out["runs"]
    rules = ("gausslegendre", "sweep")
    assert set(run["ig"]) == {f"{b}_{r}_within_5_percent" for b in ("black", "grey") for r in rules}
    assert all(0 <= v <= run["images"] == 16 for v in run["ig"].values())
    assert all(v >= 1 for v in run["path_variation_ratio"].values())  # total variation >= net change
    assert -1 <= run["gradcam_cell_spearman"] <= 1 and run["gradcam_cells"] == [2, 2]


@pytest.mark.slow
def test_distributed_json():
    out = run_bench(
        "benchmarks/distributed.py", "--recipe", "recipes/breast_cancer_mlp.yaml", "--steps", "10", "--json"
    )
    assert out["ddp_scaling_ratio"] > 0 and out["n_processes"]["steps"] == out["one_process"]["steps"] == 10
    gpt = ["--recipe", "recipes/shakespeare_char_gpt.yaml", "--steps", "4", "--strategy", "fsdp2", "--json"]
    out = run_bench("benchmarks/distributed.py", *gpt, "data.batches_per_epoch=4", "model.num_layers=1")
    assert out["fsdp2_scaling_ratio"] > 0 and out["n_processes"]["loss"] > 0


@pytest.mark.slow
def test_privacy_json():
    pytest.importorskip("opacus", reason="the privacy extra (Opacus) is not installed")
    out = run_bench(
        "benchmarks/privacy.py",
        "--recipe",
        "recipes/breast_cancer_mlp.yaml",
        "--steps",
        "3",
        "--rounds",
        "2",
        "--json",
        "privacy.dp.noise_multiplier=1.0",
    )
    assert out["dp_step_time_ratio"] > 0 and out["dp_hooks_step_time_ratio"] > 0 and out["batch_size"] == 256


@pytest.mark.skipif(importlib.util.find_spec("soundfile") is None, reason="the audio extra is not installed")
def test_audio_json():
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    out = run_bench("benchmarks/audio.py", "--seeds", "0", "--ablation", "--json", "train.epochs=1", "data.voices=6")
    assert out["model_vs_linear_accuracy_ratio"] > 0 and 0 <= out["specaugment_noisy_accuracy"] <= 1


def test_ctc_json():
    out = run_bench(
        "benchmarks/ctc.py", "--batch", "2", "--steps", "8", "--hidden", "8", "--layers", "1", "--rounds", "1", "--json"
    )
    assert out["packed_step_s"] > 0 and out["unpacked_speedup_ratio"] > 0


@needs_fashion
@pytest.mark.slow
def test_gpu_check_runs_its_code_on_cpu():
    """benchmarks/gpu.py: every part's code path at toy sizes on the CPU (no GPU here; nothing is faked as one)."""
    out = run_bench("benchmarks/gpu.py", "--device", "cpu", "--quick", "--json")
    assert out["failed_parts"] == [] and out["device"] == "cpu"
    for key in ("compile_vs_eager_ratio", "trainer_vs_hand_loop_ratio", "gpt_train_tokens_per_s"):
        assert out[key] > 0, key
    assert out["kv_vs_hf_generate_b1_ratio"] > 0 and out["kv_vs_hf_generate_b32_ratio"] > 0
    assert out["decode"]["b32"]["same_tokens"]  # our KV-cached greedy decode = transformers' on the same weights
    assert 0 <= out["quickstart"]["compiled"]["test_accuracy"] <= 1
    assert "minilm_train_samples_per_s" in out or "skipped" in out["minilm"]
    assert out["same_seed_bit_identical"] is True and out["resume_bit_identical"] is True


def test_gpu_check_without_cuda_measures_nothing():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run for minutes")
    out = run_bench("benchmarks/gpu.py", "--json")
    assert "no CUDA device" in out["skipped"] and "quickstart" not in out


@needs_fashion
def test_quickstart_as_avx2_caps_the_kernels():
    out = run_bench(
        "benchmarks/quickstart.py", "train.epochs=1", "data.limit_train=256", "--as-avx2", "--seeds", "0", "--json"
    )
    env = out["environment"]
    assert env["cpu_native_bf16"] is False and env["cpu_isa_caps"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["cpu_capability"] in ("AVX2", "DEFAULT", "NO AVX")  # never above AVX2


@needs_fashion
def test_data_benchmark_json():
    args = ["--enlarge", "2", "--epochs", "2", "--limit-train", "512", "--num-workers", "1", "--json"]
    cap = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() and os.access("/sys/fs/cgroup/memory", os.W_OK)
    if cap:  # where a memory cgroup can be made (root, cgroup v1): the on-disk runs inside a 1.5 GB cap
        args += ["--memory-cap-mb", "1500"]
    out = run_bench("benchmarks/data.py", *args)
    assert out["on_disk"]["on_disk"] and not out["in_memory"]["on_disk"] and out["train_images"] == 1024
    assert len(out["on_disk"]["rss_mb_per_epoch"]) == 2 and out["disk_vs_memory_speed_ratio"] > 0
    workers = out["on_disk_workers"]
    assert workers["num_workers"] == 1 and workers["on_disk"] and out["workers_vs_memory_speed_ratio"] > 0
    assert len(workers["pss_mb_per_epoch"]) == 2 and all(v > 0 for v in workers["pss_mb_per_epoch"])
    if cap:
        assert 0 < out["on_disk"]["cgroup"]["peak_mb"] <= 1500 and out["data_vs_memory_cap_ratio"] > 0
    files = run_bench(
        "benchmarks/data.py", "--enlarge", "1", "--epochs", "1", "--limit-train", "256", "--image-files", "--json"
    )
    assert files["source"] == "image_folder" and files["on_disk"]["on_disk"] and not files["in_memory"]["on_disk"]


@pytest.mark.slow
def test_federated_benchmark_json(tmp_path):
    """benchmarks/federated.py on the digits: central training, then FedAvg with and without SecAgg+ (2 clients, the
    Simulation Runtime when Ray is there, else real SuperNode processes)."""
    import yaml

    from bigmodel.errors import UserError
    from bigmodel.federated.runtime import flower_bin, simulation_ready
    from conftest import tiny_recipe

    try:
        flower_bin()
    except UserError as e:
        pytest.skip(str(e))
    try:
        simulation_ready(flower_bin())
        runtime = ["--simulation"]
    except UserError:
        runtime = []
    recipe = tmp_path / "fed.yaml"
    fed = {"federated.clients": 2, "federated.rounds": 1, "data.val_fraction": 0.0, "train.epochs": 1}
    recipe.write_text(yaml.safe_dump(tiny_recipe(**fed)))
    out = run_bench(
        "benchmarks/federated.py",
        "--recipe",
        str(recipe),
        "--strategies",
        "fedavg",
        "fedavg+secagg",
        "--partitions",
        "iid",
        *runtime,
        "--json",
    )
    assert out["runtime"] == ("simulation" if runtime else "deployment")
    plain, secure = out["federations"]
    assert out["central"]["epochs"] == 1 and len(plain["accuracy_per_round"]) == 1
    assert plain["bytes_per_round"] > 0 and plain["accuracy_vs_central_ratio"] > 0
    assert secure["secure_aggregation"] and not plain["secure_aggregation"]
    assert secure["bytes_per_round"] > plain["bytes_per_round"]  # masked integers and the key exchange


@pytest.mark.skipif(importlib.util.find_spec("soundfile") is None, reason="the audio extra is not installed")
def test_prepare_benchmark_json():
    out = run_bench(
        "benchmarks/prepare.py",
        "--lm-mb",
        "0.2",
        "--text-mb",
        "0.2",
        "--pairs-mb",
        "0.1",
        "--audio-clips",
        "12",
        "--speech-clips",
        "8",
        "--growth",
        "2",
        "--json",
    )
    for kind in ("lm", "text", "pairs", "audio", "speech"):
        assert out[f"{kind}_prepare_vs_whole_rss_ratio"] > 0 and out[f"{kind}_prepare_growth_ratio"] > 0
        assert out[f"{kind}_1_data_mb"] > out[f"{kind}_0_data_mb"] > 0
