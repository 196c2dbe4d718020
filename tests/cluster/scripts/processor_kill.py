"""Two ranks, each a ParallelBatchProcessor(num_processes=2, cluster="mpi") (workers and shared
memory), stepping until rank 1 SIGKILLs itself at step 50. Prints RESULT with the pids."""
import json
import os
import signal

import numpy as np

from engine import ParallelBatchProcessor
from models import MLP

rng = np.random.default_rng(0)
x, y = rng.normal(size=(512, 12)).astype(np.float32), rng.integers(0, 3, 512)
model = MLP(sizes=(12, 64, 3))
state = model.init_state(seed=0)
with ParallelBatchProcessor(model, num_processes=2, batch_size=128, cluster="mpi",
                            timeout_s=30) as processor:
    rank = processor.cluster.rank
    for step in range(400):
        state, _ = processor.process_batch(x, y, state, {"learning_rate": 1e-3})
        if step == 0:
            print("RESULT " + json.dumps(dict(rank=rank, event="started", pid=os.getpid(),
                                              workers=processor.worker_pids)), flush=True)
        if rank == 1 and step == 50:
            os.kill(os.getpid(), signal.SIGKILL)
