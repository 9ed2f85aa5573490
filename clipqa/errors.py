"""The one exception type users see.

Every problem a user can fix (a missing data folder, a bad config value, an unreachable hub model) is raised as
:class:`ClipqaError` with a one-paragraph message naming the file or config key and the fix. ``train.py`` prints
it without a traceback and exits with status 2.
"""


class ClipqaError(Exception):
    """A user-fixable problem; the message names the file/key and the fix."""


class Preempted(Exception):
    """SIGTERM (what SLURM sends before preempting) or SIGUSR2 (its time-limit warning) arrived: a checkpoint was
    saved where training had started; re-run the same command to resume."""


EXIT_PREEMPTED = 75  # train.py's exit status after a SIGTERM checkpoint (EX_TEMPFAIL: run it again)
