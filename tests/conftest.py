import sys
from pathlib import Path

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # also works under --import-mode=importlib
    sys.path.insert(0, _TESTS_DIR)

# Local HTTP Hub: fixtures `hub` (session) and `hub_env` (function); see tests/hubserver/.
from hubserver.fixtures import hub, hub_env  # noqa: E402,F401
