"""Two ranks, each holding what a node's processor holds (a shared-memory block, a forked worker
and the SIGTERM handler; built here directly so that this test does not depend on the processor),
run cross-node means; at iteration 3 rank 1 misbehaves: ``kill`` (SIGKILL itself), ``sleep``
(hangs before the collective; with ``interrupt`` rank 0 then stops its waiting thread), ``raise``
(an uncaught exception) or ``stall`` (reaches the collective, then hangs inside the transfer).
Prints RESULT lines: the pids at start, and the error a rank raised."""
import contextlib
import json
import os
import signal
import sys
import threading
import time

import multiprocess
import numpy as np

from engine.parallel import signals
from engine.parallel.cluster import ClusterError, make_cluster
from engine.parallel.shm import SharedBlock

MODE, TIMEOUT_S = sys.argv[1], float(sys.argv[2])


def _catch(errors, function, *args):
    try:
        function(*args, examples=1, loss=0.0)
    except ClusterError as error:
        errors.append(error)


def _worker(owner):
    while os.getppid() == owner:  # like the engine's workers: gone when the owner is
        time.sleep(0.05)


@contextlib.contextmanager
def node_resources():
    """A shared block and a forked worker, released on the way out (like processor.close())."""
    held = signals.hold()
    block = SharedBlock.create("clustertest", 1 << 20)
    worker = multiprocess.get_context("fork").Process(target=_worker, args=(os.getpid(),))
    worker.start()
    try:
        yield worker
    finally:
        worker.kill()
        worker.join()
        block.close()
        if held:
            signals.release()


cluster = make_cluster("mpi", timeout_s=TIMEOUT_S)
with node_resources() as worker:
    print("RESULT " + json.dumps(dict(rank=cluster.rank, event="started", pid=os.getpid(),
                                      workers=[worker.pid])), flush=True)
    buffer = np.ones(1 << 20, np.float32)
    began = None
    try:
        for iteration in range(6):
            if cluster.rank == 1 and iteration == 3:
                if MODE == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif MODE == "sleep":
                    time.sleep(120)
                elif MODE == "interrupt":
                    time.sleep(120)
                elif MODE == "raise":
                    raise RuntimeError("rank 1 fails on purpose")
                elif MODE == "stall":
                    cluster._roll_call(1, [1.0, 0.0], buffer.size)  # arrive, never transfer
                    time.sleep(120)
            began = time.monotonic()
            if MODE == "interrupt" and cluster.rank == 0 and iteration == 3:
                # The collective waits in another thread (as the processor's cross-node thread
                # does) while this one stops it, as close() does when SIGTERM unwinds it.
                errors = []
                waiting = threading.Thread(target=lambda: _catch(errors, cluster.mean_, buffer))
                waiting.start()
                time.sleep(1.0)
                cluster.interrupt()
                waiting.join()
                raise errors[0]
            cluster.mean_(buffer, examples=1, loss=0.0)
    except ClusterError as error:
        print("RESULT " + json.dumps(dict(rank=cluster.rank, event="error", ranks=error.ranks,
                                          message=str(error),
                                          after_s=time.monotonic() - began)), flush=True)
        raise
