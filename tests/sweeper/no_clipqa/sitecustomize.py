"""Put on PYTHONPATH, this makes ``import clipqa`` fail in the process (and in every Python process it starts):
the proof that the Optuna sweeper plugin and the toy apps of tests/sweeper/apps/ stand alone.

Python imports ``sitecustomize`` at start-up from the first folder on ``sys.path`` that has one; PYTHONPATH comes
before site-packages. Every blocked attempt is also written to stderr (``import of clipqa blocked: NAME``), so a test
sees an attempt that the code caught and ignored.
"""

import sys
from importlib.abc import MetaPathFinder


class _BlockClipqa(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "clipqa" or fullname.startswith("clipqa."):
            print(f"import of clipqa blocked: {fullname}", file=sys.__stderr__, flush=True)
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: the plugin must stand alone)")
        return None


sys.meta_path.insert(0, _BlockClipqa())
