"""Run ``lenvm train`` under ``accelerate launch`` with a configuration that ships with lenvm.

``lenvm train --accelerate-config NAME_OR_PATH ...`` starts the same command again, under
``accelerate launch --config_file ...``, once per process: one command works on one machine or
eight GPUs, the way ``torchrun``-wrapping trainers behave. The command it runs is printed first,
so it can be copied to run ``accelerate launch`` directly (for several hosts, for example).

Shipped configurations (``lenvm/train_configs/NAME.yaml``): ``ddp`` (data-parallel), ``fsdp``
(FSDP2, full shard), ``deepspeed_zero2`` and ``deepspeed_zero3``. On a host without GPUs the
processes form a CPU (gloo) group: ``ddp`` and ``fsdp`` run there (``accelerate`` would run
FSDP's CPU processes as plain DDP, so :class:`lenvm.training.FullTrainer` turns its FSDP2 path
on for them); DeepSpeed needs GPUs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml

from lenvm.io import InputError

CONFIGS: tuple[str, ...] = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def config_path(name_or_path: str) -> Path:
    """The YAML file of a shipped configuration name, or the given file."""
    if name_or_path in CONFIGS:
        return Path(str(resources.files("lenvm") / "train_configs" / f"{name_or_path}.yaml"))
    path = Path(name_or_path)
    if not path.is_file():
        raise InputError(
            f"{name_or_path!r} is neither a shipped accelerate configuration ({', '.join(CONFIGS)}) "
            "nor a file"
        )
    return path


def read_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not a YAML accelerate configuration ({err})") from None
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise InputError(f"{path}: an accelerate configuration needs a distributed_type")
    return config


def launched() -> bool:
    """True inside a process that a launcher (accelerate, torchrun) started."""
    return "LOCAL_RANK" in os.environ


def leave_process_group() -> None:
    """In a launched process, wait for the others, then leave the process group. A gloo group
    still alive when the interpreter shuts down can abort its process (SIGABRT), and the launcher
    then kills the others, the main one perhaps while it writes the model."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch_command(name_or_path: str, argv: list[str], num_processes: int | None = None) -> list[str]:
    """The ``accelerate launch`` command that runs ``lenvm`` with ``argv`` under a configuration.

    ``num_processes`` defaults to the number of visible accelerators (one process on a host
    without any), overriding the file's count.
    """
    path = config_path(name_or_path)
    config = read_config(path)
    if config["distributed_type"] == "DEEPSPEED" and not deepspeed_installed():
        raise InputError(
            f"{path.name} runs DeepSpeed, which is not installed: pip install 'lenvm[deepspeed]'"
        )
    devices = torch_device_count()
    if num_processes is None:
        num_processes = devices or 1
    if num_processes < 1:
        raise InputError("the number of processes must be at least 1")
    if devices and num_processes > devices:
        # Two processes on one GPU fail deep inside NCCL ("Duplicate GPU detected").
        raise InputError(
            f"{num_processes} processes asked for, but {devices} accelerator(s) visible: one process "
            "per accelerator (to train in CPU processes instead, hide them: CUDA_VISIBLE_DEVICES=)"
        )
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(path),
        "--num_processes",
        str(num_processes),
        "-m",
        "lenvm.cli",
        *argv,
    ]


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def torch_device_count() -> int:
    import torch

    return torch.accelerator.device_count() if torch.accelerator.is_available() else 0


def relaunch(name_or_path: str, argv: list[str], num_processes: int | None = None) -> int:
    """Run ``lenvm argv`` under ``accelerate launch``; returns its exit status."""
    command = launch_command(name_or_path, argv, num_processes)
    print("lenvm: running " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command).returncode
