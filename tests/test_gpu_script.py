"""benchmarks/gpu.py, the script for the first GPU at hand, runs on the CPU at its quick size
(so it is not broken when a GPU appears) and prints every part's table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu_quick():
    # the machine's cache: SmolLM2's conversion is made once per machine, not once per test
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for title in ("## Per-example gradients", "| MiniLM-L6 |", "| SmolLM2-135M |",
                  "## bfloat16 collection against float32", "## Influence step",
                  "| LiSSA |", "## Pairwise top-10", "## detect-mislabeled", "| gradients |",
                  "all parts:"):
        assert title in done.stdout, title


def test_gpu_script_refuses_a_device_it_lacks():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda:99", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "device" in done.stderr
