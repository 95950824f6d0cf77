"""The shipped accelerate configurations and the relaunch of ``lenvm train`` under them.

DeepSpeed is not run here (accelerate starts it only on accelerators; it is an optional extra),
so for it these tests check what a GPU run starts from: that each file loads and that the
launcher accepts the command lenvm builds and turns it into the environment the training
processes read. For FSDP they also check that the plugin built from that environment wraps the
backbone's layers; tests/test_distributed.py trains under it on two CPU processes.
"""

import argparse
from types import SimpleNamespace

import pytest
import torch

from lenvm import launch
from lenvm.cli.commands import _without
from lenvm.io import InputError


@pytest.mark.parametrize("name", launch.CONFIGS)
def test_shipped_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(launch.config_path(name)))
    expected = {
        "ddp": "MULTI_GPU",
        "fsdp": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
    }
    assert config.distributed_type.value == expected[name]
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def _accelerate_args(command: list[str]) -> argparse.Namespace:
    """What ``accelerate launch`` makes of lenvm's command, before it starts any process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(command[3:])
    _validate_launch_command(args)
    return args


def test_fsdp_launch_builds_a_full_shard_plugin_that_wraps_the_backbone_layers(tiny_path, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from lenvm.model import LengthValueModel

    monkeypatch.setattr(launch, "torch_device_count", lambda: 4)
    command = launch.launch_command("fsdp", ["train", "--rollouts", "r.jsonl"], num_processes=4)
    assert command[-5:] == ["-m", "lenvm.cli", "train", "--rollouts", "r.jsonl"]
    args = _accelerate_args(command)
    assert args.use_fsdp and args.num_processes == 4 and args.training_script == "lenvm.cli" and args.module
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    lenvm = LengthValueModel.from_base(tiny_path, kind="standalone")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, lenvm)
    wrapped = [name for name, module in lenvm.named_modules() if policy(module)]
    assert wrapped == ["backbone.layers.0", "backbone.layers.1"]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_launch(stage, monkeypatch):
    name = f"deepspeed_zero{stage}"
    monkeypatch.setattr(launch, "deepspeed_installed", lambda: False)
    with pytest.raises(InputError, match="lenvm\\[deepspeed\\]"):
        launch.launch_command(name, ["train"])
    monkeypatch.setattr(launch, "deepspeed_installed", lambda: True)
    monkeypatch.setattr(launch, "torch_device_count", lambda: 8)
    args = _accelerate_args(launch.launch_command(name, ["train"], num_processes=8))
    assert args.use_deepspeed and args.zero_stage == stage and args.num_processes == 8
    assert args.gradient_clipping == 1.0 and args.zero3_save_16bit_model is (stage == 3)


def test_deepspeed_is_refused_without_a_gpu(tiny_path, monkeypatch):
    if torch.accelerator.is_available():
        pytest.skip("this host has an accelerator")
    from lenvm.model import LengthValueModel
    from lenvm.training import FullTrainer, TrainConfig

    lenvm = LengthValueModel.from_base(tiny_path, kind="standalone")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(InputError, match="DEEPSPEED was asked for, but there is no GPU"):
        FullTrainer(lenvm, TrainConfig(kind="standalone"), tiny_path, "fp", progress=False)


def test_fsdp1_is_refused_on_cpu_processes(monkeypatch):
    """FSDP on CPU processes goes through FSDP2 only (tests/test_distributed.py runs it)."""
    from accelerate.utils import DistributedType

    from lenvm.training import _fsdp_on_cpu

    monkeypatch.setenv("FSDP_VERSION", "1")
    accelerator = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    with pytest.raises(InputError, match="FSDP2 only"):
        _fsdp_on_cpu(accelerator)


def test_config_names_paths_and_errors(tmp_path):
    assert launch.config_path("ddp").name == "ddp.yaml" and launch.config_path("ddp").is_file()
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    assert launch.config_path(str(own)) == own
    assert launch.launch_command(str(own), ["train"], num_processes=1)[4] == str(own)
    with pytest.raises(InputError, match="neither a shipped"):
        launch.config_path("zero9")
    (tmp_path / "bad.yaml").write_text("just: text\n")
    with pytest.raises(InputError, match="distributed_type"):
        launch.launch_command(str(tmp_path / "bad.yaml"), ["train"])
    with pytest.raises(InputError, match="at least 1"):
        launch.launch_command("ddp", ["train"], num_processes=0)


def test_more_processes_than_accelerators_are_refused(monkeypatch):
    """Two processes on one GPU would fail inside NCCL; on a host without any, CPU processes."""
    monkeypatch.setattr(launch, "torch_device_count", lambda: 1)
    assert launch.launch_command("ddp", ["train"])[6] == "1"
    with pytest.raises(InputError, match="2 processes asked for, but 1 accelerator"):
        launch.launch_command("ddp", ["train"], num_processes=2)
    monkeypatch.setattr(launch, "torch_device_count", lambda: 0)
    assert launch.launch_command("ddp", ["train"], num_processes=2)[6] == "2"


def test_relaunch_drops_only_the_launch_flags():
    argv = ["train", "--rollouts", "r", "--accelerate-config", "fsdp", "--num-processes=2", "--lam", "0.9"]
    assert _without(argv, ("--accelerate-config", "--num-processes")) == [
        "train",
        "--rollouts",
        "r",
        "--lam",
        "0.9",
    ]


def test_a_launched_process_leaves_its_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    launch.leave_process_group()
    assert not dist.is_initialized()
    launch.leave_process_group()  # no group: nothing to do
