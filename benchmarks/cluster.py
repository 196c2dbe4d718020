"""What crossing nodes costs: the MPI allreduce of a node's buffer against the in-node reduce and
the memory-copy floor, and a training step of the reference MLP split into its parts.

    mpirun -np 2 --bind-to core .venv/bin/python benchmarks/cluster.py [--quick]
    (as root, also export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)

Two ranks on one machine stand for two nodes, each bound to its own core (unbound, the two ranks'
busy-polling allreduce shares cores with each other and with neighbours and swings 0.4-40 ms for
1M values): the cross-node figures are then Open MPI's shared-memory transport, the best case of
a real link; docs/cluster.md turns them and the link speeds into the cost model. The in-node
parts run on rank 0 with its affinity widened to every core while rank 1 waits.

What is timed, for P in {1M, 4M, 16M, 64M} float32, in rounds whose
order rotates (the memory bandwidth drifts and must hit every side alike), each sample started
by both ranks together:
* ``cross_node_mean``: ``Cluster.mean_`` as a step pays it (roll call with the example counts,
  scaling, in-place ``Allreduce``), on both ranks;
* ``mpi_allreduce``: the bare in-place ``Allreduce`` of the same buffer (the library alone);
* ``copy_floor``: ``np.copyto`` of P float32 on both ranks at once (an allreduce of two ranks
  on one host moves at least that);
* ``in_node_sync``: on rank 0 alone (rank 1 waits), the ``sync_s`` that ``process_batch``
  reports for a stub model of P weights on 2 workers: the shared-memory reduce-scatter + SGD;
* ``roll_call``: ``Cluster.sum_`` of one number (the fixed per-collective cost).
Then one node's step of each reference model (rank 0, 2 workers) at its batch and half of it,
and the cost model built from these figures (step time and efficiency at 2-64 nodes over 10, 25
and 100 Gb/s; the two link constants it needs are stated below as assumptions).
The training step (reference MLP 784-1024-256-10, Adam, global batch 256) runs on 2 nodes x 1
worker with ``cluster="mpi"`` and, interleaved, on one node x 1 worker with the node's share of
the batch (128): ``step_efficiency`` = that single-node step time / the 2-node step time (1.0:
crossing nodes costs nothing), both timed as one ``process_batch`` call started by both ranks
together. The 2-node step is split into compute, in-node sync (reduce + update), cross-node sync
(scaling + transfer) and cross-node wait (the roll call: waiting for the slower node).
Last line: ``cluster allreduce_ms_16m=X step_efficiency=Y``.
"""
import _common  # noqa: F401 - first: puts the repository root on sys.path

import json
import math
import os
import time

import numpy as np

from _common import CpuLoad, format_seconds, log, parse_args, report_cleanup, rotated, summarize
from _common import write_results
from engine import ParallelBatchProcessor
from engine.parallel.cluster import make_cluster
from sync_overhead import ConstantGradientModel

SIZES = (1 << 20, 4 << 20, 16 << 20, 64 << 20)
FULL = dict(rounds=6, repeats=8, warmup=2, steps=60)
QUICK = dict(rounds=2, repeats=2, warmup=1, steps=4, sizes=(1 << 20, 16 << 20))
SIDES = ("cross_node_mean", "mpi_allreduce", "copy_floor", "in_node_sync", "roll_call")


class _WholeMachine:
    """Rank 0's CPU affinity widened to every core for a block (its workers inherit it)."""

    def __enter__(self):
        self.saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, range(os.cpu_count()))

    def __exit__(self, *exc_info):
        os.sched_setaffinity(0, self.saved)


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
        with _WholeMachine():  # the processor sees, and its pool starts on, every core
            processor = ParallelBatchProcessor(model, num_processes=2, batch_size=2,
                                               optimizer="sgd")
            processor.process_batch(x, y, state, {"learning_rate": 1e-9})

    def once(side):
        cluster.barrier()  # both ranks start the sample together
        began = time.perf_counter()
        if side == "cross_node_mean":
            cluster.mean_(buffer, examples=1 + cluster.rank)
        elif side == "mpi_allreduce":
            cluster.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        elif side == "copy_floor":
            np.copyto(target, source)
        elif side == "roll_call":
            cluster.sum_([1.0])
        elif processor is not None:  # in_node_sync: rank 0 alone, rank 1 idles in the barrier
            with _WholeMachine():
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


def _reference_models():
    from models import CNN1D, MLP
    return {"mlp": (MLP(sizes=(784, 1024, 256, 10)), (784,), 10, 256),
            "cnn": (CNN1D(), None, 10, 100)}


def _synthetic(model, feature_shape, classes, rows, seed=0):
    rng = np.random.default_rng(seed)
    if feature_shape is None:
        feature_shape = tuple(model.input_shape)
    return (rng.normal(size=(rows, *feature_shape)).astype(np.float32),
            rng.integers(0, classes, size=rows))


def measure_node_steps(cluster, plan):
    """One node's step (rank 0 alone, both cores, 2 workers; rank 1 waits) for each reference
    model at its batch and at half of it: compute_s, sync_s, wait_s and wall_s medians, the
    figures the cost model scales. Returns {model: {batch: parts}} (empty on other ranks)."""
    record = {}
    for name, (model, feature_shape, classes, batch) in _reference_models().items():
        record[name] = dict(num_weights=int(model.init_state(seed=0).buffer.size), batches={})
        for rows in (batch, batch // 2):
            cluster.barrier()
            if cluster.is_root:
                x, y = _synthetic(model, feature_shape, classes, rows)
                state = model.init_state(seed=0)
                steps = {key: [] for key in ("compute_s", "sync_s", "wait_s", "wall_s")}
                with _WholeMachine(), ParallelBatchProcessor(model, num_processes=2,
                                                             batch_size=rows,
                                                             optimizer="adam") as processor:
                    for index in range(plan["steps"] + 3):  # 3 warm-up steps
                        state, step = processor.process_batch(x, y, state,
                                                              {"learning_rate": 1e-4})
                        if index >= 3:
                            for key in steps:
                                steps[key].append(float(step[key]))
                record[name]["batches"][rows] = {key: summarize(values)
                                                 for key, values in steps.items()}
            cluster.barrier()
    return record if cluster.is_root else {}


def measure_cluster_step(cluster, plan):
    """The reference MLP on 2 nodes x 1 worker (global batch 256, ``cluster="mpi"``) against one
    node x 1 worker with the node's share (128), alternating step by step. step_efficiency =
    the single-node step / the 2-node step (1.0: crossing nodes costs nothing)."""
    model, feature_shape, classes, batch = _reference_models()["mlp"]
    x, y = _synthetic(model, feature_shape, classes, batch)
    state = model.init_state(seed=0)
    params = {"learning_rate": 1e-4}
    keys = ("call_s", "wall_s", "compute_s", "sync_s", "in_node_sync_s", "cluster_s",
            "cluster_wait_s", "wait_s")
    cluster_steps, single_steps = {key: [] for key in keys}, []
    share = slice(*cluster.node_share(batch))
    x_share, y_share = x[share].copy(), y[share].copy()  # the same objects every call (cached)
    with ParallelBatchProcessor(model, num_processes=1, batch_size=batch, optimizer="adam",
                                cluster="mpi") as multi, \
            ParallelBatchProcessor(model, num_processes=1, batch_size=share.stop - share.start,
                                   optimizer="adam") as single:
        multi_state = single_state = state
        for block in range(plan["steps"] + 3):  # blocks of one step each; 3 warm up
            for side in rotated(("cluster", "single"), block):
                if side == "cluster":
                    before = dict(multi.cluster.totals)
                    cluster.barrier()  # both sides' calls start with the ranks together
                    began = time.perf_counter()
                    multi_state, step = multi.process_batch(x, y, multi_state, params)
                    call_s = time.perf_counter() - began
                    crossing = {key: multi.cluster.totals[key] - before[key]
                                for key in ("roll_call_s", "scale_s", "transfer_s")}
                    # sync_s holds the in-node reduce and update and the cross-node part.
                    step = dict(step, call_s=call_s, cluster_wait_s=crossing["roll_call_s"],
                                cluster_s=crossing["scale_s"] + crossing["transfer_s"])
                    step["in_node_sync_s"] = max(0.0, step["sync_s"] - step["cluster_s"] -
                                                 step["cluster_wait_s"])
                    if block >= 3:
                        for key in keys:
                            cluster_steps[key].append(float(step[key]))
                    continue
                cluster.barrier()
                if cluster.is_root:
                    began = time.perf_counter()
                    single_state, _ = single.process_batch(x_share, y_share, single_state,
                                                           params)
                    if block >= 3:
                        single_steps.append(time.perf_counter() - began)
                cluster.barrier()
    record = dict(model="MLP(784, 1024, 256, 10)", global_batch=batch,
                  node_batch=share.stop - share.start,
                  cluster_step={key: summarize(values) for key, values in cluster_steps.items()},
                  single_node_step=summarize(single_steps),
                  samples=dict(cluster=cluster_steps, single=single_steps))
    if cluster.is_root:
        # Both timed the same way: one process_batch call, the ranks started together.
        record["step_efficiency"] = (record["single_node_step"]["median_s"] /
                                     record["cluster_step"]["call_s"]["median_s"])
        record["step_efficiency_p10"] = (record["single_node_step"]["p10_s"] /
                                         record["cluster_step"]["call_s"]["p10_s"])
    return record


# -- the cost model ------------------------------------------------------------------------------
# Link figures that two ranks on one machine cannot measure, stated as assumptions: Open MPI over
# TCP reaches about 80% of the line rate on large messages, and one small message takes about
# 30 us across a switch. The rest comes from this run.
LINKS_GBIT_S = (10, 25, 100)
NODE_COUNTS = (2, 4, 8, 16, 32, 64)
LINK_EFFICIENCY = 0.8
LINK_LATENCY_S = 30e-6
# The Keras reference model is not run here (TensorFlow startup); its one-node step is the figure
# measured by benchmarks/vs_keras.py (docs/performance.md: engine 2p x 1 thread, batch 64).
KERAS_REFERENCE = dict(num_weights=739_226, batch=64, step_s=0.176)
# The MLP's one-node step on a quiet machine, 2 processes (docs/performance.md, scaling.py: compute
# 9.20 + sync 1.82 + wait 0.41 ms): the figure to trust when this run's machine was busy.
MLP_QUIET_REFERENCE = dict(num_weights=1_068_810, batch=256, step_s=0.01143)


def cross_node_seconds(nodes, gbit_s, num_values, roll_call_s, message_s, copy_s_per_byte):
    """Modelled cross-node part of a step: roll call, the scaling pass, and Open MPI's allreduce
    (the better of ring and recursive doubling) over a link of ``gbit_s``."""
    size = num_values * 4
    per_byte = 1.0 / (gbit_s * 1e9 / 8 * LINK_EFFICIENCY)
    ring = 2 * (nodes - 1) / nodes * size * per_byte + 2 * (nodes - 1) * LINK_LATENCY_S
    doubling = math.ceil(math.log2(nodes)) * (LINK_LATENCY_S + size * per_byte)
    # The roll call's messages travel in parallel: one latency, plus posting one send and one
    # receive per peer on top of what the 2-rank roll call measured here.
    roll_call = roll_call_s + LINK_LATENCY_S + (nodes - 2) * message_s
    return roll_call + size * copy_s_per_byte + min(ring, doubling)


def measure_message_cost(cluster, count=2000):
    """Seconds to post and complete one small send/receive pair (to this rank itself)."""
    MPI, comm = cluster.MPI, cluster.comm
    inbox, outbox = np.zeros(8), np.zeros(8)
    began = time.perf_counter()
    for _ in range(count):
        receive = comm.Irecv(inbox, source=cluster.rank, tag=99)
        send = comm.Isend(outbox, dest=cluster.rank, tag=99)
        MPI.Request.Waitall([receive, send])
    return (time.perf_counter() - began) / count


def cost_model(records, node_steps, message_s):
    """Step time and efficiency at 2-64 nodes over 10/25/100 Gb/s for the reference models, from
    this run's one-node steps, roll call and copy floor (one node = this machine, per-node batch
    fixed); ``accumulate_for_90`` is how many times more examples per sync (gradient
    accumulation, or update_interval in states mode) bring the efficiency to 90%."""
    # Each input is the run's 10th percentile: other processes' load only ever adds time, and on
    # a shared machine the median carries their share (the medians are in the JSON too).
    # The roll call does not depend on P: its least p10 over the sizes (the least disturbed).
    roll_call_s = float(min(r["roll_call"]["p10_s"] for r in records))
    copy_s_per_byte = float(np.median([r["copy_floor"]["p10_s"] / r["bytes"] for r in records]))
    models = {}
    for name, entry in node_steps.items():
        batch = max(entry["batches"], key=int)  # JSON turns the batch keys into strings
        models[name] = dict(num_weights=entry["num_weights"], batch=int(batch),
                            step_s=entry["batches"][batch]["wall_s"]["p10_s"])
    models["mlp_quiet"] = MLP_QUIET_REFERENCE
    models["keras_imu_cnn_bilstm"] = KERAS_REFERENCE
    rows = []
    for name, model in models.items():
        for gbit_s in LINKS_GBIT_S:
            for nodes in NODE_COUNTS:
                cross = cross_node_seconds(nodes, gbit_s, model["num_weights"], roll_call_s,
                                           message_s, copy_s_per_byte)
                step = model["step_s"] + cross
                rows.append(dict(model=name, link_gbit_s=gbit_s, nodes=nodes,
                                 node_step_ms=model["step_s"] * 1e3, cross_node_ms=cross * 1e3,
                                 step_ms=step * 1e3, efficiency=model["step_s"] / step,
                                 accumulate_for_90=max(1, math.ceil(9 * cross / model["step_s"]))))
    return dict(inputs=dict(roll_call_s=roll_call_s, message_s=message_s,
                            copy_s_per_byte=copy_s_per_byte,
                            link_efficiency=LINK_EFFICIENCY, link_latency_s=LINK_LATENCY_S,
                            models=models), rows=rows)


def markdown_table(model):
    """The cost model as docs/cluster.md shows it: per model and link, the step time and the
    efficiency at each node count, and the accumulation factor for 90% at 64 nodes."""
    header = " | ".join(f"{n} nodes" for n in NODE_COUNTS)
    lines = [f"| model (one-node step) | link | {header} | x for 90% at 64 |",
             "|---|---|" + "---:|" * (len(NODE_COUNTS) + 1)]
    inputs = model["inputs"]["models"]
    keys = sorted({(row["model"], row["link_gbit_s"]) for row in model["rows"]},
                  key=lambda key: (list(inputs).index(key[0]), key[1]))
    for name, link in keys:
        rows = {row["nodes"]: row for row in model["rows"]
                if row["model"] == name and row["link_gbit_s"] == link}
        cells = " | ".join(f"{rows[n]['step_ms']:.1f} ms ({rows[n]['efficiency']:.2f})"
                           for n in NODE_COUNTS)
        lines.append(f"| {name} ({inputs[name]['step_s'] * 1e3:.1f} ms, "
                     f"{inputs[name]['num_weights']:,} values) | {link} Gb/s | {cells} | "
                     f"x{rows[NODE_COUNTS[-1]]['accumulate_for_90']} |")
    return "\n".join(lines)


def main():
    args = parse_args(__doc__.splitlines()[0], lambda parser: parser.add_argument(
        "--table", metavar="RESULTS_JSON", default=None,
        help="print the cost model of a results file as a markdown table (no MPI) and exit"))
    if args.table:
        with open(args.table) as f:
            document = json.load(f)
        print(markdown_table(cost_model(document["measurements"], document["node_steps"],
                                        document["cost_model"]["inputs"]["message_s"])))
        return
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
    message_s = measure_message_cost(cluster)
    node_steps = measure_node_steps(cluster, plan)
    try:
        step = measure_cluster_step(cluster, plan)
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
        model = cost_model(records, node_steps, message_s)
        for row in model["rows"]:
            if row["nodes"] in (2, 8, 64):
                log(f"model {row['model']} {row['link_gbit_s']} Gb/s x {row['nodes']} nodes: "
                    f"step {row['step_ms']:.1f} ms (cross-node {row['cross_node_ms']:.2f} ms), "
                    f"efficiency {row['efficiency']:.2f}, x{row['accumulate_for_90']} for 90%")
        path = write_results("cluster", args, records, step=step, node_steps=node_steps,
                             cost_model=model, plan=plan, cleanup=cleanup,
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
