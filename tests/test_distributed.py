"""Full fine-tuning with two CPU processes (gloo) under the shipped DDP and FSDP configurations.

DeepSpeed is not among them: accelerate starts it only on accelerators (and it is an optional
extra); tests/test_launch.py checks its configurations load and what the launcher makes of them.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import synthetic_records

from lenvm.training import TrainConfig, train

# Not the defaults: TD(lambda) targets, a Huber loss that is not MSE in disguise, per-completion
# aggregation and a streamed rollouts file, so that every part must split across processes.
OPTIONS = dict(
    kind="standalone",
    epochs=2,
    lr=1e-3,
    bf16=False,
    eval_fraction=0.25,
    checkpoint_every=3,
    lam=0.8,
    loss="huber",
    huber_delta=0.05,
    aggregation="seq-mean-token-mean",
    stream=True,
)


def _flags(options: dict) -> list[str]:
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_effective_batch(
    engine, tmp_path, tiny_path, tiny_generator
):
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(tiny_generator[1])))
    cmd = [sys.executable, "-m", "lenvm.cli", "train", "--accelerate-config", engine, "--num-processes", "2"]
    cmd += ["--rollouts", str(rollouts), "--base", str(tiny_path), "--out", str(tmp_path / "two")]
    cmd += ["--batch-size", "2", *_flags(OPTIONS)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU processes, on any host
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate.commands.launch --config_file" in proc.stderr  # the command is shown
    assert proc.stdout.count('"metrics"') == 1  # printed by the main process only
    two = json.loads((tmp_path / "two" / "training_log.json").read_text())
    saved = json.loads((tmp_path / "two" / "config.json").read_text())["training"]
    assert saved["streamed"] and saved["lam"] == 0.8
    # The engine really ran: under FSDP (full shard) each process holds half of every
    # parameter, so the run cannot have fallen back to DDP, where each holds all of them.
    layout = saved["distributed"]
    assert layout["processes"] == 2
    assert layout["type"] == {"ddp": "MULTI_CPU", "fsdp": "FSDP"}[engine]
    share = layout["parameters_on_main_process"] / layout["parameters"]
    assert share == (pytest.approx(0.5, abs=0.01) if engine == "fsdp" else 1.0)

    one = train(
        str(rollouts), str(tiny_path), tmp_path / "one", TrainConfig(batch_size=4, **OPTIONS), progress=False
    )
    # The aggregated loss over the effective batch: the same trajectory, whatever the split.
    np.testing.assert_allclose(two["losses"], one.losses, rtol=2e-4)
    for key in ("prompt_mre", "rel_error_at_0", "rel_error_at_30", "rel_error_at_60", "rel_error_at_90"):
        assert two["metrics"][key] == pytest.approx(one.metrics[key], rel=1e-3)
    assert [e["step"] for e in two["evaluations"]] == [e["step"] for e in one.evaluations]
    assert (tmp_path / "two" / "backbone" / "config.json").exists()
