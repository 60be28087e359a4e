"""A real Slurm cluster (controller + two emulated nodes) for the launcher tests, started once per
module that asks for it. Where it cannot be installed or started the tests fail with the reason:
CI runs them, so they must never pass by skipping."""
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import Cluster, SlurmUnavailable, workspace  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    root = workspace("megamom-slurm-")
    c = Cluster(root / "slurm")
    try:
        c.start()
    except SlurmUnavailable as e:
        c.stop()
        pytest.fail(f"the Slurm test cluster did not start: {e}", pytrace=False)
    c.work = root
    # what every job gets from sbatch's exported environment: this interpreter, one thread per process
    c.env.update(MEGAMOM_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1",
                 PATH=f"{Path(sys.executable).parent}{os.pathsep}{c.env.get('PATH', '')}")
    c.env.pop("MEGAMOM_CACHE", None)  # under /tmp, which jobs do not see
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
