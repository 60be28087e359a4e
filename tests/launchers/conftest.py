"""A real Slurm cluster (controller + two emulated nodes) for the launcher tests, started once per
module that asks for it. Where it cannot be installed or started the tests fail with the reason:
CI runs them, so they must never pass by skipping."""
import os
import shutil
import subprocess
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
    try:
        python = _python_jobs_see(root)
    except SlurmUnavailable as e:
        c.stop()
        pytest.fail(f"the Slurm test cluster cannot run this Python: {e}", pytrace=False)
    # what every job gets from sbatch's exported environment: this interpreter, one thread per process
    c.env.update(MEGAMOM_PYTHON=python, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1",
                 PATH=f"{Path(python).parent}{os.pathsep}{c.env.get('PATH', '')}")
    c.env.pop("MEGAMOM_CACHE", None)  # under /tmp, which jobs do not see
    try:
        yield c
    finally:
        c.stop()
        if python != sys.executable:
            subprocess.run(["umount", "-l", str(root / "venv")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _python_jobs_see(root: Path) -> str:
    """This interpreter, as the jobs can run it. A virtual environment under /tmp (a checkout there)
    is hidden from the jobs (each has a private /tmp): it is bind-mounted under `root` for them (a
    venv finds its packages next to the path it is started from)."""
    prefix = Path(sys.prefix)
    if not prefix.resolve().is_relative_to("/tmp") or prefix == Path(sys.base_prefix):
        return sys.executable
    target = root / "venv"
    target.mkdir()
    r = subprocess.run(["mount", "--bind", str(prefix), str(target)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SlurmUnavailable(f"the virtual environment {prefix} lies under /tmp, which Slurm jobs here do not "
                               f"see, and bind-mounting it failed ({r.stderr.strip()}): put the checkout outside /tmp")
    return str(target / Path(sys.executable).relative_to(prefix))
