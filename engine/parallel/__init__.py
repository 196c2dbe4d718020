"""Processes and shared memory: blocks, workspace, workers, the pool and the processor."""
