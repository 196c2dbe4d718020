"""``engine.fit(..., cluster="mpi")`` on every rank with the same output_dir: rank 0 writes it,
rank 0 saves the final state to STATE; every rank prints its state's digest and what it wrote."""
import hashlib
import json
import os
import sys

import numpy as np

from engine import fit
from models import MLP

OUT, STATE = sys.argv[1], sys.argv[2]
OPTIONS = dict(epochs=3, batch_size=101, learning_rate=0.05, seed=3, verbose=True)


def problem():
    """The tests' 3-class blobs (600 examples, 12 features)."""
    rng = np.random.default_rng(7)
    centers = rng.normal(0, 3, size=(3, 12))
    labels = rng.integers(0, 3, size=600)
    return (centers[labels] + rng.normal(size=(600, 12))).astype(np.float32), labels


x, y = problem()
history = fit(MLP(sizes=(12, 16, 3)), x, y, num_processes=1, cluster="mpi", output_dir=OUT,
              **OPTIONS)
from mpi4py import MPI  # noqa: E402 - already initialised by fit

rank = MPI.COMM_WORLD.Get_rank()
if rank == 0:
    np.save(STATE, history.state.buffer)
print("RESULT " + json.dumps(dict(rank=rank, loss=history.history["loss"],
                                  digest=hashlib.sha256(history.state.buffer.tobytes()).hexdigest(),
                                  files=sorted(os.listdir(OUT)) if os.path.isdir(OUT) else [])),
      flush=True)
