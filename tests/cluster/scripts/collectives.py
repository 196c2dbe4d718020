"""Each rank: a float32 buffer and an example count of its own; checks every collective against a
NumPy oracle that regenerates all ranks' inputs. Prints RESULT {json} per rank."""
import hashlib
import json
import os
import sys

import numpy as np

from engine.parallel.cluster import make_cluster

SIZE = int(sys.argv[1]) if len(sys.argv) > 1 else 100_003


def node_inputs(rank):
    rng = np.random.default_rng(100 + rank)
    return rng.normal(size=SIZE).astype(np.float32), [37, 91, 5][rank % 3], 0.5 + rank


cluster = make_cluster("mpi", timeout_s=30)
rank, size = cluster.rank, cluster.size
buffer, examples, loss = node_inputs(rank)
got_loss, got_examples = cluster.mean_(buffer, examples, loss)

inputs = [node_inputs(r) for r in range(size)]
counts = np.array([item[1] for item in inputs], np.float64)
expected = (counts[:, None] / counts.sum() * np.stack([item[0] for item in inputs]).astype(
    np.float64)).sum(0)
expected_loss = float(np.dot(counts, [item[2] for item in inputs]) / counts.sum())

prescaled = node_inputs(rank)[0] * np.float32(examples / counts.sum())
cluster.mean_(prescaled, examples, loss, scaled=True)
sums = cluster.sum_([rank + 0.25, 1.0, 1e-17 * (rank + 1)])
many = cluster.sum_(np.arange(1000, dtype=np.float64) * (rank + 1))  # past the roll call's room
many_ok = bool(np.array_equal(many, np.arange(1000) * sum(r + 1 for r in range(size))))
state = np.arange(10, dtype=np.float32) * (rank + 1)
cluster.bcast_(state)
cluster.barrier()
start, stop = cluster.node_share(11)
rows = np.arange(33, dtype=np.float32).reshape(11, 3)
gathered = cluster.gather_rows(rows[start:stop] * 1.0, 11)
cluster.check_same([7, 2.5], "batch sizes")
try:
    cluster.check_same([rank], "ranks")
    disagreement = None
except Exception as error:  # ClusterError naming the other rank
    disagreement = dict(type=type(error).__name__, ranks=list(error.ranks), message=str(error))
digest = hashlib.sha256(buffer.tobytes()).hexdigest()
print("RESULT " + json.dumps(dict(
    rank=rank, size=size, local_size=cluster.local_size, pid=os.getpid(),
    max_relative_error=float(np.max(np.abs(buffer - expected) / (np.abs(expected) + 1e-6))),
    max_abs_error=float(np.max(np.abs(buffer - expected))),
    max_abs_error_scaled=float(np.max(np.abs(prescaled - expected))),
    loss=got_loss, expected_loss=expected_loss, examples=got_examples,
    expected_examples=float(counts.sum()), sums=sums.tolist(),
    bcast=state.tolist(), digest=digest, share=cluster.node_share(101),
    gathered_ok=bool(np.array_equal(gathered, rows)), disagreement=disagreement,
    many_ok=many_ok)), flush=True)
cluster.close()
