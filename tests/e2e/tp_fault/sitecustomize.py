"""Loaded by every Python process started with this folder on PYTHONPATH (the fault test's
server and its spawned workers): a worker rank's forward raises on its WINNOW_TEST_FAIL_STEP-th
step. Test-only; it never ships."""

import os

_FAIL_AT = int(os.environ.get("WINNOW_TEST_FAIL_STEP", "0"))

if _FAIL_AT:
    import winnow.distributed.worker as _worker

    _real_run_step = _worker.run_step
    _steps = [0]

    def _failing_run_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        _steps[0] += 1
        if _steps[0] >= _FAIL_AT:
            raise RuntimeError("injected fault in a worker's forward")
        return _real_run_step(*args, **kwargs)

    _worker.run_step = _failing_run_step
