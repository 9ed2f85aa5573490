"""The one error type of the sweeper: a problem the user can fix, told in one paragraph that names the key.

Hydra prints a :class:`SweeperError` without a traceback and exits 1 (it is a ``CompactHydraException``). Hooks
(:mod:`.hooks`) raise it too for a problem in their own settings.
"""

from hydra.errors import CompactHydraException


class SweeperError(CompactHydraException):
    """A problem the user can fix (one paragraph naming the key): Hydra prints the message alone and exits 1."""
