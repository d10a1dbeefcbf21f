"""A helper forked by the writer does not keep the root locked after the writer dies
(issue 10 item 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import safepoint

_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import safepoint

    mgr = safepoint.CheckpointManager(sys.argv[1])
    mgr.save({"w": np.ones(4, np.float32)}, step=1)  # holds the writer lock from here on
    if sys.argv[2] == "fork":
        pid = os.fork()
        if pid == 0:  # a helper (a data-loader worker...) that outlives the writer
            time.sleep(120)
            os._exit(0)
    else:
        import multiprocessing as mp
        proc = mp.get_context("fork").Process(target=time.sleep, args=(120,), daemon=False)
        proc.start()
        pid = proc.pid
    print(pid, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["fork", "multiprocessing"])
def test_a_forked_helper_does_not_keep_the_lock_after_the_writer_is_killed(
    tmp_path: Path, how: str
) -> None:
    root = tmp_path / "run"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root), how], stdout=subprocess.PIPE, text=True
    )
    helper = 0
    try:
        assert writer.stdout is not None
        helper = int(writer.stdout.readline())
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
        os.kill(helper, 0)  # the helper is alive
        time.sleep(0.1)
        with safepoint.CheckpointManager(root) as mgr:  # the restarted writer
            mgr.save({"w": np.zeros(4, np.float32)}, step=2)
            assert [c.step for c in mgr.checkpoints()] == [1, 2]
        os.kill(helper, 0)  # still alive: it was not the helper's death that freed the root
    finally:
        writer.kill()
        writer.wait(30)
        if writer.stdout is not None:
            writer.stdout.close()
        if helper:
            os.kill(helper, signal.SIGKILL)
