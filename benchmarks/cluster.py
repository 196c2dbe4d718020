"""What crossing nodes costs: the MPI allreduce of a node's buffer against the in-node reduce and
the memory-copy floor, and a training step of the reference MLP split into its parts.

    mpirun -np 2 --oversubscribe --bind-to none .venv/bin/python benchmarks/cluster.py [--quick]
    (as root, also export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)

Two ranks on one machine stand for two nodes: the cross-node figures are then Open MPI's
shared-memory transport, the best case of a real link; docs/cluster.md turns them and the link
speeds into the cost model. What is timed, for P in {1M, 4M, 16M, 64M} float32, in rounds whose
order rotates (the memory bandwidth drifts and must hit every side alike), each sample started
by both ranks together:
* ``cross_node_mean``: ``Cluster.mean_`` as a step pays it (roll call with the example counts,
  scaling, in-place ``Allreduce``), on both ranks;
* ``mpi_allreduce``: the bare in-place ``Allreduce`` of the same buffer (the library alone);
* ``copy_floor``: ``np.copyto`` of P float32 on both ranks at once (an allreduce of two ranks
  on one host moves at least that);
* ``in_node_sync``: on rank 0 alone (rank 1 waits), the ``sync_s`` that ``process_batch``
  reports for a stub model of P weights on 2 workers: the shared-memory reduce-scatter + SGD.
The training step (reference MLP 784-1024-256-10, Adam, global batch 256) runs on 2 nodes x 1
worker with ``cluster="mpi"`` and, interleaved, on one node x 1 worker with the node's share of
the batch (128): ``step_efficiency`` = that single-node step time / the 2-node step time (1.0:
crossing nodes costs nothing). Last line: ``cluster allreduce_ms_16m=X step_efficiency=Y``.
"""
import _common  # noqa: F401 - first: puts the repository root on sys.path

import time

import numpy as np

from _common import CpuLoad, format_seconds, log, parse_args, report_cleanup, rotated, summarize
from _common import write_results
from engine import ParallelBatchProcessor
from engine.parallel.cluster import make_cluster
from sync_overhead import ConstantGradientModel

SIZES = (1 << 20, 4 << 20, 16 << 20, 64 << 20)
FULL = dict(rounds=6, repeats=8, warmup=2, steps=30)
QUICK = dict(rounds=2, repeats=2, warmup=1, steps=4, sizes=(1 << 20, 16 << 20))
SIDES = ("cross_node_mean", "mpi_allreduce", "copy_floor", "in_node_sync")


def measure_size(cluster, num_values, plan):
    """Rounds of the four sides for one P; returns the record (timings on this rank)."""
    MPI = cluster.MPI
    buffer = np.full(num_values, 1e-3, np.float32)
    source, target = np.ones(num_values, np.float32), np.empty(num_values, np.float32)
    samples = {side: [] for side in SIDES}
    processor = None
    if cluster.is_root:
        model = ConstantGradientModel(num_values)
        state = model.init_state(seed=0)
        x, y = np.zeros((2, 1), np.float32), np.zeros(2, np.int64)
        processor = ParallelBatchProcessor(model, num_processes=2, batch_size=2, optimizer="sgd")

    def once(side):
        cluster.barrier()  # both ranks start the sample together
        began = time.perf_counter()
        if side == "cross_node_mean":
            cluster.mean_(buffer, examples=1 + cluster.rank)
        elif side == "mpi_allreduce":
            cluster.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        elif side == "copy_floor":
            np.copyto(target, source)
        elif processor is not None:  # in_node_sync: rank 0 alone, rank 1 idles in the barrier
            _, step = processor.process_batch(x, y, state, {"learning_rate": 1e-9})
            return step["sync_s"]
        elapsed = time.perf_counter() - began
        np.copyto(buffer, 1e-3)  # keep the values finite and equal across samples
        return elapsed

    try:
        for side in SIDES * plan["warmup"]:
            once(side)
        for turn in range(plan["rounds"]):
            for side in rotated(SIDES, turn):
                for _ in range(plan["repeats"]):
                    samples[side].append(once(side))
    finally:
        if processor is not None:
            processor.close()
    stats = {side: summarize(values) for side, values in samples.items()}
    if not cluster.is_root:
        stats.pop("in_node_sync")
    return dict(num_values=num_values, bytes=num_values * 4, **stats,
                samples={side: values for side, values in samples.items() if side in stats})


def _reference_mlp():
    from models import MLP
    return MLP(sizes=(784, 1024, 256, 10))


def measure_step(cluster, plan):
    """2 nodes x 1 worker (global batch 256) against 1 node x 1 worker (batch 128), alternating
    blocks of steps; returns per-step timings of both (the single node runs on rank 0)."""
    rng = np.random.default_rng(0)
    batch = 256
    x = rng.normal(size=(batch, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=batch)
    model = _reference_mlp()
    state = model.init_state(seed=0)
    params = {"learning_rate": 1e-4}
    keys = ("wall_s", "compute_s", "sync_s", "wait_s", "cluster_s", "cluster_wait_s")
    cluster_steps = {key: [] for key in keys}
    single_steps = []
    share = slice(*cluster.node_share(batch))
    with ParallelBatchProcessor(model, num_processes=1, batch_size=batch, optimizer="adam",
                                cluster="mpi") as multi, \
            ParallelBatchProcessor(model, num_processes=1, batch_size=share.stop - share.start,
                                   optimizer="adam") as single:
        multi_state = single_state = state
        for block in range(plan["rounds"] + 1):  # block 0 warms up
            for side in rotated(("cluster", "single"), block):
                for _ in range(plan["steps"] // plan["rounds"] or 1):
                    if side == "cluster":
                        multi_state, step = multi.process_batch(x, y, multi_state, params)
                        if block:
                            for key in keys:
                                cluster_steps[key].append(float(step.get(key, np.nan)))
                    else:
                        cluster.barrier()
                        if cluster.is_root:
                            began = time.perf_counter()
                            single_state, _ = single.process_batch(x[share], y[share],
                                                                   single_state, params)
                            if block:
                                single_steps.append(time.perf_counter() - began)
                        cluster.barrier()
    record = dict(model="MLP(784, 1024, 256, 10)", num_weights=int(state.buffer.size),
                  global_batch=batch, node_batch=share.stop - share.start,
                  cluster_step={key: summarize(values) for key, values in cluster_steps.items()},
                  single_node_step=summarize(single_steps),
                  samples=dict(cluster=cluster_steps, single=single_steps))
    if cluster.is_root:
        record["step_efficiency"] = (record["single_node_step"]["median_s"] /
                                     record["cluster_step"]["wall_s"]["median_s"])
    return record


def main():
    args = parse_args(__doc__.splitlines()[0])
    plan = QUICK if args.quick else FULL
    cluster = make_cluster("mpi", timeout_s=600)
    root = cluster.is_root
    if cluster.size != 2 and root:
        log(f"note: {cluster.size} ranks; the figures assume 2 (mpirun -np 2)")
    load = CpuLoad()
    records = []
    for num_values in plan.get("sizes", SIZES):
        record = measure_size(cluster, num_values, plan)
        records.append(record)
        if root:
            log(f"P={num_values:,}: " + " | ".join(
                f"{side} {format_seconds(record[side]['median_s'])}" for side in SIDES) +
                f" | cross-node mean / copy floor "
                f"{record['cross_node_mean']['median_s'] / record['copy_floor']['median_s']:.2f}")
    try:
        step = measure_step(cluster, plan)
    except TypeError as error:  # a processor without cluster= (before the cross-node hook)
        if "cluster" not in str(error):
            raise
        step = dict(step_efficiency=float("nan"), cluster_step={}, single_node_step={},
                    skipped=str(error))
        if root:
            log(f"training step not measured: {error}")
    if root and "skipped" not in step:
        parts = step["cluster_step"]
        log("step on 2 nodes x 1 worker: " + " | ".join(
            f"{key[:-2]} {format_seconds(parts[key]['median_s'])}" for key in parts
            if parts[key].get("count")) +
            f"; one node, its share: {format_seconds(step['single_node_step']['median_s'])}")
    if root:
        cleanup, cpu = report_cleanup(load)
        headline = dict(allreduce_ms_16m=next(r["cross_node_mean"]["median_s"] * 1e3 for r in
                                              records if r["num_values"] == 16 << 20)
                        if any(r["num_values"] == 16 << 20 for r in records) else float("nan"),
                        step_efficiency=step["step_efficiency"])
        path = write_results("cluster", args, records, step=step, plan=plan, cleanup=cleanup,
                             cpu_load=cpu, ranks=cluster.size, local_size=cluster.local_size,
                             mpi_library=cluster.MPI.Get_library_version().splitlines()[0],
                             headline=headline)
        print(f"results: {path}")
        print(f"cluster allreduce_ms_16m={headline['allreduce_ms_16m']:.2f} "
              f"step_efficiency={headline['step_efficiency']:.2f}", flush=True)
    cluster.barrier()
    cluster.close()


if __name__ == "__main__":
    main()
