"""fit/evaluate over a processor: trainer, callbacks, schedules, history, checkpoints, data."""
