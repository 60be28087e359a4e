"""Slurm launchers: `train.sbatch` (multi-node training), `prep.sbatch` (data prep job array and its
merge) and the helper they call, `python -m megamom.launchers.slurm` (see docs/launch.md)."""
from importlib import resources


def script_path(name: str) -> str:
    """Where the installed copy of a batch script is (to copy it, or to submit it as it is)."""
    return str(resources.files(__name__) / name)
