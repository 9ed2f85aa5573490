"""The one exception type users see.

Every problem a user can fix (a missing data folder, a bad config value, an unreachable hub model) is raised as
:class:`ClipqaError` with a one-paragraph message naming the file or config key and the fix. ``train.py`` prints
it without a traceback and exits with status 2.
"""


class ClipqaError(Exception):
    """A user-fixable problem; the message names the file/key and the fix."""
