"""Training past one process: DDP under torchrun (two gloo processes on the CPU), the notebook launcher, the FSDP2
configuration, the checks that turn bad setups into clear errors, and the kernels' handling of FSDP2 shards.

The GPU halves (NCCL DDP and FSDP2 QLoRA on two GPUs) are marked `multigpu`; benchmarks/distributed.py measures them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from slothbook.device import DeviceInfo, fsdp_requested, training_device
from slothbook.errors import ConfigError, DeviceError
from slothbook.train import distributed
from slothbook.train.distributed import check_backend, check_fresh_process, check_gpus, common_dtype

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)
    env.pop("TRITON_INTERPRET", None)  # the worker trains with plain forwards (kernels are off on the CPU)
    return env


# ---------------------------------------------------------------- DDP under torchrun


@pytest.fixture(scope="module")
def ddp_and_single(train_model_name, tmp_path_factory):
    """The same script run unchanged under torchrun (2 ranks x batch 1) and alone (batch 2), side by side."""
    from slothbook.models.loader import resolve_source

    model = resolve_source(train_model_name)  # converted once here, not by two ranks at the same time
    base = tmp_path_factory.mktemp("ddp")
    two, one = base / "two", base / "one"
    two.mkdir(), one.mkdir()
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), str(WORKER), model, str(two), "--batch", "1", "--steps", str(STEPS)],
        cwd=base, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    alone = subprocess.run([sys.executable, str(WORKER), model, str(one), "--batch", "2", "--steps", str(STEPS)],
                           cwd=base, env=_env(), capture_output=True, text=True, timeout=600)
    log = ddp.communicate(timeout=600)[0]
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert ddp.returncode == 0, log[-3000:]
    return [torch.load(two / f"rank{r}.pt") for r in range(2)], torch.load(one / "rank0.pt"), log


def test_ranks_end_with_identical_lora_weights(ddp_and_single):
    (r0, r1), _, _ = ddp_and_single
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["lora"].keys() == r1["lora"].keys() and len(r0["lora"]) > 0
    for name, w in r0["lora"].items():
        assert torch.equal(w, r1["lora"][name]), name


def test_ddp_equals_one_process_with_the_same_global_batch(ddp_and_single):
    (r0, _), single, _ = ddp_and_single
    assert single["world_size"] == 1
    moved = max((w - 0).abs().max().item() for n, w in single["lora"].items() if "lora_B" in n)
    assert moved > 1e-4  # LoRA B starts at zero: training moved it well past the tolerance below
    for name, w in single["lora"].items():
        torch.testing.assert_close(r0["lora"][name], w, rtol=0, atol=1e-5, msg=name)
    assert len(r0["losses"]) == len(single["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)


def test_only_rank_zero_prints_the_loss_lines(ddp_and_single):
    _, _, log = ddp_and_single
    assert sum(line.startswith("step ") for line in log.splitlines()) == STEPS


# ---------------------------------------------------------------- the notebook launcher (accelerate's), on the CPU

LAUNCH_SCRIPT = """
import os, sys
import slothbook

def train(out, scale=1):
    import torch.distributed as dist
    from slothbook.device import training_device
    from slothbook.train.distributed import is_main_process
    dist.init_process_group("gloo")
    value = [None] * dist.get_world_size()
    dist.all_gather_object(value, dist.get_rank() * scale)
    with open(os.path.join(out, f"rank{dist.get_rank()}.txt"), "w") as f:
        f.write(f"{os.environ['WORLD_SIZE']} {training_device()} {is_main_process()} {value}")
    dist.barrier()  # leave together: rank 0 hosts the store the other rank still uses
    dist.destroy_process_group()

slothbook.launch(train, sys.argv[1], num_gpus=2, cpu=True, port=int(sys.argv[2]), scale=10)
"""


def test_launch_forks_one_process_per_rank_on_the_cpu(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(LAUNCH_SCRIPT))
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(_free_port())], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "2 cpu True [0, 10]"
    assert (tmp_path / "rank1.txt").read_text() == "2 cpu False [0, 10]"


def test_launch_refuses_a_kernel_where_cuda_is_initialised(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(DeviceError, match="Restart the kernel and call slothbook.launch"):
        check_fresh_process()


def test_launch_refuses_a_kernel_that_imported_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", sys)  # any module object: only its presence is read
    with pytest.raises(DeviceError, match="bitsandbytes is already imported"):
        check_fresh_process()


# ---------------------------------------------------------------- bad setups


def test_more_gpus_than_present_says_how_many_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="2 GPUs were asked for, but this machine has 1 CUDA GPU"):
        check_gpus(2)


def test_gpus_asked_for_on_a_machine_without_any():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU.*cpu=True"):
        check_gpus(2)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        distributed.launch(print, num_gpus=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_num_gpus_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="num_gpus"):
        check_gpus(bad)


def _gpu(index, name, bf16):
    return DeviceInfo(index, name, "8.0" if bf16 else "7.5", bf16, 16 * 2**30, 16 * 2**30)


def test_mixed_gpus_without_bf16_fall_back_to_fp16_or_say_to_use_it():
    mixed = [_gpu(0, "NVIDIA A100", True), _gpu(1, "Tesla T4", False)]
    assert common_dtype(mixed) == torch.float16
    assert common_dtype(mixed, "fp16") == torch.float16
    with pytest.raises(DeviceError, match=r"cuda:1 Tesla T4 .*different kinds.*dtype='fp16'"):
        common_dtype(mixed, "bf16")
    assert common_dtype([_gpu(0, "H200", True), _gpu(1, "H200", True)]) == torch.bfloat16
    with pytest.raises(ConfigError, match="Unknown dtype"):
        common_dtype(mixed, "int8")


def test_nccl_missing_is_explained():
    if torch.distributed.is_nccl_available():
        pytest.skip("this torch build has NCCL")
    with pytest.raises(DeviceError, match="NCCL is not available.*gloo.*CPU.*CUDA build of torch"):
        check_backend()
    assert check_backend(cpu=True) == "gloo"


def test_a_rank_beyond_the_visible_gpus_is_explained(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(DeviceError, match="LOCAL_RANK 3, but only 2 GPU"):
        training_device()


def test_one_process_on_the_cpu_loads_on_the_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert training_device() == "cpu"


# ---------------------------------------------------------------- FSDP2


def test_fsdp2_config_is_one_accelerate_reads(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    path = distributed.write_fsdp2_config(tmp_path / "fsdp2.yaml", "LlamaDecoderLayer", num_processes=2)
    config = load_config_from_file(str(path))
    assert config.distributed_type == "FSDP" and config.num_processes == 2 and config.mixed_precision == "bf16"
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    with pytest.raises(ConfigError, match="layer_class"):
        distributed.fsdp2_config("Llama Decoder")


def test_accelerate_fsdp_asks_for_shardable_4bit_storage(monkeypatch):
    from slothbook.models.quantization import quantization_config

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested()
    assert quantization_config(True, False, torch.bfloat16, shardable=fsdp_requested()).bnb_4bit_quant_storage \
        == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets with an FSDP config
    assert fsdp_requested()
    assert quantization_config(True, False, torch.bfloat16, shardable=fsdp_requested()).bnb_4bit_quant_storage \
        == torch.bfloat16


@pytest.fixture
def one_rank_mesh():
    """A one-process gloo group and CPU mesh, enough to make real DTensors; torn down after the test."""
    from torch.distributed.device_mesh import init_device_mesh

    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        torch.distributed.destroy_process_group()


def test_kernels_leave_fsdp2_shards_to_the_modules_own_forward(one_rank_mesh):
    """Between its FSDP unit's forward hooks a LoRA weight is a DTensor shard: the fused kernel must not read it."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.tensor import Shard, distribute_tensor

    from slothbook.models.patch import lora_parts

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 16)), LoraConfig(r=4, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert lora_parts(layer) is not None  # plain LoRA over a 16-bit base: fused
    a = layer.lora_A["default"]
    a.weight = nn.Parameter(distribute_tensor(a.weight.detach(), one_rank_mesh, [Shard(0)]))
    assert lora_parts(layer) is None


def test_nf4_state_is_found_on_the_layer_once_fsdp2_gathers_a_plain_parameter():
    """FSDP2 gives back a Params4bit as a plain Parameter (bf16 storage): the kernels read the layer's quant state."""
    from peft import LoraConfig, get_peft_model

    from slothbook.kernels.nf4 import NF4Weight
    from slothbook.models.patch import lora_parts
    from slothbook.models.quantization import quantization_config

    bnb = pytest.importorskip("bitsandbytes")
    storage = quantization_config(True, False, torch.float32, shardable=True).bnb_4bit_quant_storage
    linear = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                               quant_storage=storage).to("cpu")  # .to() quantizes
    assert linear.weight.dtype == torch.float32 and linear.quant_state is not None
    model = get_peft_model(nn.Sequential(linear), LoraConfig(r=4, target_modules=["0"]))
    layer = model.base_model.model[0]
    packed = layer.base_layer.weight
    layer.base_layer._parameters["weight"] = nn.Parameter(packed.data.clone(), requires_grad=False)  # as FSDP2 does
    parts = lora_parts(layer)
    assert parts is not None and isinstance(parts[0].weight, NF4Weight)
    assert parts[0].weight.shape == torch.Size([64, 64])


# ---------------------------------------------------------------- two GPUs (run by benchmarks/distributed.py too)


@pytest.mark.multigpu
def test_ddp_and_fsdp2_qlora_train_on_two_gpus(tmp_path):
    """NCCL DDP (8B shape) on 1 and 2 GPUs and accelerate FSDP2 (70B shape) on 2: every part trains, none errs."""
    out = tmp_path / "distributed.json"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "benchmarks" / "distributed.py"),
                           "--steps", "3", "--warmup", "1", "--out", str(out)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if r["metric"] == "error"], rows
    assert {r["config"] for r in rows if r["metric"] == "tokens_per_s"} == {
        "ddp llama-3.1-8b x1", "ddp llama-3.1-8b x2", "fsdp2 llama-3.1-70b x2"}


# ---------------------------------------------------------------- %%slothbook finetune --gpus N


def test_magic_gpus_option():
    from slothbook.magics import parse_gpus, usage

    assert parse_gpus([], {}) == 1
    assert parse_gpus(["--gpus", "2"], {}) == 2
    assert parse_gpus([], {"--gpus": "4"}) == 4  # --gpus=4
    with pytest.raises(ConfigError, match="positive integer"):
        parse_gpus(["--gpus", "0"], {})
    with pytest.raises(ConfigError, match="only --gpus N"):
        parse_gpus([], {"steps": "3"})
    assert "%%slothbook finetune [--gpus N]" in usage()
