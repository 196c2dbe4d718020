"""Plain data and maths, no processes: the state, kernels, optimizers, sharding, checks, errors."""
