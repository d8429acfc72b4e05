"""Session-wide isolation for tests and doctests: nothing reads or writes the user's dirs."""

import os
import tempfile


def pytest_configure(config):
    home = tempfile.mkdtemp(prefix="chx-masks-test-")
    # The embedded registry keeps its empty-catalog template in the cache
    # directory; share one per run, apart from the user's.
    os.environ["XDG_CACHE_HOME"] = os.path.join(home, "cache")
    os.environ["XDG_DATA_HOME"] = os.path.join(home, "data")
    # tiled reads its profile search path once, at import: fix it for the run.
    os.environ["TILED_PROFILES"] = os.path.join(home, "tiled-profiles")
    for name in ("CHX_MASKS_URI", "CHX_MASKS_API_KEY", "CHX_MASKS_PROFILE", "CHX_MASKS_DIR"):
        os.environ.pop(name, None)
    # Commands on an embedded registry serve it in their own process: a local
    # server per test directory would outlive the test (tests/test_local_server.py
    # switches it on where it is the subject).
    os.environ["CHX_MASKS_LOCAL_SERVER"] = "0"
    # tiled's client retries a lost server for up to 45 s by default; tests of
    # a stopped server need the refusal, not the patience.
    os.environ.setdefault("TILED_RETRY_TIMEOUT", "3")
