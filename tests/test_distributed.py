"""Full fine-tuning under ``accelerate launch`` with two CPU processes (gloo)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import synthetic_records

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from lenvm.training import TrainConfig, train
    records, base, out, batch_size = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], int(sys.argv[4])
    config = TrainConfig(kind="standalone", epochs=2, lr=1e-3, batch_size=batch_size, bf16=False,
                         eval_fraction=0.25, checkpoint_every=3)
    result = train(records, base, out, config, progress=False)
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        json.dump({"losses": result.losses, "world": int(os.environ.get("WORLD_SIZE", "1"))},
                  open(out + ".result.json", "w"))
    """
)


def _launch(tmp_path, tiny_path, processes, batch_size, name):
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT)
    out = str(tmp_path / name)
    # On a host without GPUs, --multi_gpu still starts one process per rank and the trainer's
    # Accelerator(cpu=True) joins them in a gloo group.
    launch = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--cpu"]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(tmp_path / "records.json"),
        str(tiny_path),
        out,
        str(batch_size),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(open(out + ".result.json").read())


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_effective_batch(tmp_path, tiny_path, tiny_generator):
    (tmp_path / "records.json").write_text(json.dumps(synthetic_records(tiny_generator[1])))
    two = _launch(tmp_path, tiny_path, processes=2, batch_size=2, name="two")
    one = _launch(tmp_path, tiny_path, processes=1, batch_size=4, name="one")
    assert two["world"] == 2 and one["world"] == 1
    # Token-mean loss over the effective batch: identical trajectories, whatever the split.
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=2e-4)
    assert (tmp_path / "two" / "backbone" / "config.json").exists()
