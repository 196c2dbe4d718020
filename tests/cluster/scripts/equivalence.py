"""2 nodes x 1 worker: two epochs of ``run_parallel`` with ``cluster="mpi"``; rank 0 saves the
final state to OUT; every rank prints its state's digest and the per-step losses."""
import hashlib
import json
import sys

import numpy as np
from mpi4py import MPI

from engine import ParallelBatchProcessor
from models import MLP

SYNC, OUT = sys.argv[1], sys.argv[2]
OPTIONS = dict(batch_size=101, sync=SYNC, update_interval=2, optimizer="adam", seed=3)


def problem():
    """The tests' 3-class blobs (600 examples, 12 features); 101 does not divide 600 or 2."""
    rng = np.random.default_rng(7)
    centers = rng.normal(0, 3, size=(3, 12))
    labels = rng.integers(0, 3, size=600)
    return (centers[labels] + rng.normal(size=(600, 12))).astype(np.float32), labels


x, y = problem()
model = MLP(sizes=(12, 16, 3))
state = model.init_state(seed=0)
losses = []
with ParallelBatchProcessor(model, num_processes=1, cluster="mpi", **OPTIONS) as processor:
    for epoch in range(2):
        state, results = processor.run_parallel(x, y, state, {"learning_rate": 0.05})
        losses.extend(results["loss"].tolist())
rank = MPI.COMM_WORLD.Get_rank()
if rank == 0:
    np.save(OUT, state.buffer)
print("RESULT " + json.dumps(dict(rank=rank, losses=losses,
                                  digest=hashlib.sha256(state.buffer.tobytes()).hexdigest())),
      flush=True)
