"""The error a bad configuration raises, and the exit codes of `megamom train`, in a module of its
own (no torch) so that any module can use them without importing the config or the trainer
(megamom.parallel.layout checks configs that megamom.config builds; the launchers read the codes)."""

# `megamom train` exit codes: 0 finished; 2 bad config or input; EXIT_STOPPED: stopped by SIGTERM /
# SIGUSR1 / Ctrl-C after writing a checkpoint (EX_TEMPFAIL: run the same command again, or requeue
# the job, to resume); anything else: an error.
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 75


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""
