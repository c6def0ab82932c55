"""Errors a user can fix, and the exit statuses of the `skyjax` command.

`UserError` is a mistake in what the user gave (a config value, a folder, a data file): the command prints one line,
`skyjax <command>: error: <message>`, and exits with `USER_ERROR_EXIT_STATUS`; `SKYJAX_DEBUG=1` prints the
traceback as well. Messages name the file or key and say what to do. The config, checkpoint, record and sharding
errors (`ConfigError`, `CheckpointError`, `RecordError`, `BadRowError`, `ShardingError`) are `UserError`s.

`Preempted` is raised by a training run stopped by SIGTERM (a TPU/cluster preemption) or SIGINT (Ctrl-C) once its
checkpoint is saved: the command exits with `PREEMPTED_EXIT_STATUS` and writes no final outputs, so a scheduler can
tell a preempted run (rerun it: it resumes) from a finished one (0) and a failed one (1, 2).
"""

from __future__ import annotations

import signal

USER_ERROR_EXIT_STATUS = 2
# 128 + SIGTERM, what a shell reports for a process killed by SIGTERM: "stopped, not finished; rerun to resume"
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM  # 143
INTERRUPTED_EXIT_STATUS = 128 + signal.SIGINT  # 130: Ctrl-C outside training (loading, converting, ...)


class UserError(Exception):
    """A mistake the user can fix; the CLI prints its message as one line and exits with status 2."""


class Preempted(Exception):
    """A training run stopped by a signal after saving its checkpoint (no final outputs were written)."""

    def __init__(self, signum: int, step: int, checkpoints):
        self.signum, self.step, self.checkpoints = signum, step, checkpoints
        name = signal.Signals(signum).name
        super().__init__(f"{name}: saved a checkpoint at step {step} in {checkpoints}; stopped before the end (no "
                         f"final checkpoint, export or summary.json): rerun the same command to resume "
                         f"(exit status {PREEMPTED_EXIT_STATUS})")
