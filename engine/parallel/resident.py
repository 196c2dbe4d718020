"""How much of the shared data set a worker keeps mapped, and so counts in its resident size.

The data set sits once in shared memory for every worker, but each page a worker has read stays
mapped and counts in its RSS: on the reference IMU workload, 72 MiB per worker for 72 MiB of
data. ``ExamplesWindow`` unmaps the examples (``SharedBlock.unmap_pages``: the values stay) once a
worker has mapped about ``WINDOW_BYTES`` of them, but only where mapping them again costs at most
``MAX_SHARE`` of the worker's compute: a page read after the unmap is a minor fault (with the
kernel's fault-around, about 7 us per row here), nothing next to an 86 ms recurrent step, too
much next to the 40 us per row of an MLP, whose data then stays mapped.
"""
WINDOW_BYTES = 16 << 20
FAULT_AROUND_BYTES = 64 << 10  # what reading one unmapped page maps (the kernel's fault-around)
REFAULT_S = 10e-6  # per row of up to FAULT_AROUND_BYTES, unmapping and mapping again: 7-8 us
#                    measured for 6.6 KiB rows on a 2-core AMD EPYC
MAX_SHARE = 0.01


class ExamplesWindow:
    """Counts the rows a worker reads and the compute they took; unmaps when both say so."""

    def __init__(self):
        # refaults: faults that mapping the rows read since the last unmap again would take
        self.mapped_bytes, self.refaults, self.compute_s = 0, 0, 0.0

    def reading(self, data, rows):
        """Called before the worker reads ``rows`` rows of ``data.examples``."""
        examples = data.examples
        if examples.nbytes <= WINDOW_BYTES or rows <= 0:
            return  # small data sets stay mapped: they cost at most this much RSS anyway
        row_bytes = examples.strides[0]
        self.mapped_bytes += rows * max(row_bytes, FAULT_AROUND_BYTES)
        # A row larger than the fault-around faults in once per fault-around block.
        self.refaults += rows * -(-row_bytes // FAULT_AROUND_BYTES)
        if self.mapped_bytes > WINDOW_BYTES:
            if self.compute_s * MAX_SHARE >= self.refaults * REFAULT_S:
                data.unmap("examples")
            self.mapped_bytes, self.refaults, self.compute_s = 0, 0, 0.0

    def computed(self, seconds):
        """Compute time of the step whose rows were just read."""
        self.compute_s += seconds
