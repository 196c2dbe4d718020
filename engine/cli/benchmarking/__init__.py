"""``engine bench``: the engine's benchmarks on the user's machine and model.

``sync`` times the averaging of P float32 values across N workers against a memory-copy floor,
``scaling`` trains the model at 1 .. usable cores processes, ``step`` splits a step's time into
compute, sync and wait. Each returns a JSON-ready record (``runs``), drawn by ``plots``; the
floor (N forked processes copying their share of the same bytes) is in ``floor``.
"""
