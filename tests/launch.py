"""Run a training worker script once in one process and once under `accelerate launch` with two (CPU, gloo)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path


def one_and_two_processes(worker: str, args: list, root: Path, port: int) -> tuple[Path, Path]:
    """Run tests/<worker> with args + [out] as one process and as two; return the two output folders."""
    script = Path(__file__).with_name(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMHOPS_MODEL_THREADS": "1"}
    one, two = root / "one", root / "two"
    subprocess.run([sys.executable, str(script), *map(str, args), str(one)], check=True, env=env)
    launcher = shutil.which("accelerate")
    assert launcher, "accelerate is part of the [train] extra"
    # --multi_gpu is accelerate's switch to its torchrun launcher; without GPUs the processes run on the CPU
    r = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                        str(script), *map(str, args), str(two)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return one, two
