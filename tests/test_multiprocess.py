"""Real multi-process training (torchrun, gloo on CPU) and the shipped accelerate configs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NUM_SAMPLES, NUM_EPOCHS, NUM_PROCESSES = 9, 2, 2  # as in tests/multiprocess_train.py


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: list[str], script: Path, *args, timeout=600) -> str:
    """Run `script args` on NUM_PROCESSES CPU processes: launcher is ["torchrun"] or ["accelerate", CONFIG]."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if launcher[0] == "torchrun":  # `torchrun`, as the README writes it, is this module
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NUM_PROCESSES}",
                   f"--master_port={free_port()}"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher[1]),
                   "--main_process_port", str(free_port())]
    command += [str(script), *map(str, args)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def check_sampler_run(tmp_path):
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(NUM_PROCESSES)]
    assert [record["world_size"] for record in records] == [NUM_PROCESSES] * NUM_PROCESSES
    steps_per_epoch = records[0]["batches_per_epoch"]
    assert steps_per_epoch == 3  # 9 samples in batches of 2: 5 batches, one halved to make 6 for 2 processes
    assert all(len(record["batches"]) == NUM_EPOCHS * steps_per_epoch for record in records)

    epoch_orders = []
    for epoch in range(NUM_EPOCHS):
        per_rank = [record["batches"][epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch] for record in records]
        seen = [index for batches in per_rank for batch in batches for index in batch]
        assert sorted(seen) == list(range(NUM_SAMPLES)), f"epoch {epoch}: {per_rank}"  # disjoint, complete
        epoch_orders.append(per_rank)
    assert epoch_orders[0] != epoch_orders[1]  # the sampler's epoch reached every process

    assert records[0]["after"] == records[1]["after"]  # DDP kept the replicas identical
    assert records[0]["after"] != records[0]["initial"]

    # Resumed from the checkpoint after step 4 (inside epoch 1): each process trains on exactly the batches the
    # uninterrupted run trained on after that step, in the same order, and ends with the same weights.
    for record in records:
        assert record["resumed_batches"] == record["batches"][4:]
        assert record["resumed_after"] == record["after"]
    return records


@pytest.mark.slow
def test_two_processes_split_every_epoch_exactly_resume_exactly_and_stay_identical(tmp_path):
    launch(["torchrun"], REPO / "tests" / "multiprocess_train.py", tmp_path)
    check_sampler_run(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp_bf16.yaml", "fsdp_bf16.yaml"])
def test_accelerate_configs_train_exactly_and_resume(tmp_path, config):
    """The shipped configs, as written, on 2 CPU processes. On a CPU-only machine accelerate (1.15) runs every
    multi-process config as MULTI_CPU (DDP over gloo): it only switches FSDP on for accelerator devices, so here
    the FSDP config trains data-parallel (bf16 autocast), and the FSDP sharding itself is tested with torch below."""
    launch(["accelerate", REPO / "examples" / "accelerate" / config], REPO / "tests" / "multiprocess_train.py",
           tmp_path)
    records = check_sampler_run(tmp_path)
    assert records[0]["distributed_type"].endswith("MULTI_CPU"), records[0]  # the script trains with use_cpu=True
    assert records[0]["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_deepspeed_zero2_trains_exactly_and_resumes(tmp_path):
    """ZeRO-2 through accelerate launch on 2 CPU processes (deepspeed is optional: pip install deepspeed)."""
    pytest.importorskip("deepspeed")
    launch(["accelerate", REPO / "examples" / "accelerate" / "deepspeed_zero2.yaml"],
           REPO / "tests" / "multiprocess_train.py", tmp_path, "one_factor")
    records = check_sampler_run(tmp_path)
    assert records[0]["distributed_type"].endswith("DEEPSPEED"), records[0]


@pytest.mark.slow
def test_fsdp2_shards_the_model_on_two_cpu_processes_and_resumes_exactly(tmp_path):
    """torch's FSDP2 (what fsdp_bf16.yaml selects) on gloo: the config's layer classes as shard units, a sharded
    checkpoint at step 4, a resumed run that ends with the same weights, and gathered weights the model loads."""
    launch(["torchrun"], REPO / "tests" / "multiprocess_train.py", tmp_path, "fsdp2")
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(NUM_PROCESSES)]
    for record in records:
        assert record["parameter_type"] == "DTensor" and record["shard_units"] == 3  # 2 LM layers and the root
        assert record["local_numel"] < record["full_numel"]  # each process holds part of the weights
        assert record["losses"][0] > record["losses"][-1]
        assert record["resumed_losses"] == record["losses"][4:]
    assert records[0]["tower_calls"] != records[1]["tower_calls"]  # the tower ran a different number of times
    # at some step the two processes' batches used different shuffle factors (an unused projection on one of them)
    assert any(a != b for a, b in zip(records[0]["factors_used"], records[1]["factors_used"]))
    assert records[0]["local_numel"] + records[1]["local_numel"] >= records[0]["full_numel"]
    assert records[0]["after"] == records[0]["resumed_after"] != records[0]["initial"]
    assert records[0]["loaded_strict"] is True


@pytest.mark.slow
def test_two_machines_launch_as_the_readme_shows(tmp_path):
    """The README's multi-node command, two "machines" on this host (machine ranks 0 and 1, one process each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    port = free_port()
    machines = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(REPO / "examples" / "accelerate" / "ddp_bf16.yaml"), "--num_machines", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), "--num_processes", "2",
             str(REPO / "tests" / "multiprocess_train.py"), str(tmp_path)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    logs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    check_sampler_run(tmp_path)


# --- the README's launch commands, as written (plus a free port and tiny settings) --------------------------

LAUNCHERS = {
    "torchrun": ["torchrun"],
    "accelerate-ddp": ["accelerate", REPO / "examples" / "accelerate" / "ddp_bf16.yaml"],
    "accelerate-fsdp": ["accelerate", REPO / "examples" / "accelerate" / "fsdp_bf16.yaml"],
    "accelerate-deepspeed": ["accelerate", REPO / "examples" / "accelerate" / "deepspeed_zero2.yaml"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_main_job_launches_on_two_processes(tmp_path, launcher):
    if launcher == "accelerate-deepspeed":
        pytest.importorskip("deepspeed")
    out = tmp_path / "digits"
    log = launch(LAUNCHERS[launcher], REPO / "examples" / "finetune.py", "--output_dir", out, "--max_steps", 3,
                 "--train_samples", 48, "--eval_samples", 4, "--batch_size", 4, "--max_side", 160, "--threads", 1)
    assert log.count("training 3 steps") == NUM_PROCESSES  # every process ran the job
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_samples"] == 4 and 0 <= metrics["digit_accuracy"] <= 1
    assert (out / "model" / "model.safetensors").is_file()
    assert log.count("reloaded") == 1  # the main process evaluates and reloads; every process took part in saving


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate-ddp"])
def test_dataset_job_launches_on_two_processes(tmp_path, launcher):
    import datasets

    from test_finetune import make_backbones, square_images

    make_backbones(tmp_path)
    images, names = square_images(24)
    datasets.Dataset.from_dict(
        {"image": images, "question": ["What colour is the square?"] * 24, "answer": [f"a {n} square" for n in names]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}),
    ).save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "run"
    log = launch(LAUNCHERS[launcher], REPO / "examples" / "finetune.py", "--vision_model", tmp_path / "vision",
                 "--text_model", tmp_path / "text", "--dataset", tmp_path / "data", "--output_dir", out,
                 "--max_steps", 2, "--batch_size", 2, "--eval_samples", 2, "--max_image_tokens", 16,
                 "--max_side", 96, "--max_new_tokens", 3, "--threads", 1)
    assert log.count("fine-tuning") == NUM_PROCESSES
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "dataset" and metrics["eval_samples"] == 2
    assert (out / "model" / "model.safetensors").is_file()


# --- accelerate configs --------------------------------------------------------------------------------


def load_config(name):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(REPO / "examples" / "accelerate" / name))


def test_ddp_config_is_bf16_data_parallel():
    config = load_config("ddp_bf16.yaml")
    assert config.distributed_type == "MULTI_GPU" and config.mixed_precision == "bf16"


def test_fsdp_config_wraps_layers_the_model_has():
    from modeling_nanovlm import NanoVLMForConditionalGeneration, tiny_config

    config = load_config("fsdp_bf16.yaml")
    assert config.distributed_type == "FSDP" and config.mixed_precision == "bf16"
    assert config.fsdp_config["fsdp_version"] == 2
    layer_classes = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    model_classes = {type(module).__name__ for module in NanoVLMForConditionalGeneration(tiny_config()).modules()}
    assert set(layer_classes) <= model_classes  # accelerate raises on a class the model does not have
