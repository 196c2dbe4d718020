"""The default job: train the MNIST-1D CNN on every usable core and report its test accuracy.

    python -m engine.demo [--steps 6000] [--processes N] [--output runs/demo]
"""
import argparse
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from engine import ParallelBatchProcessor, usable_cores
from engine.training.data import load_mnist1d
from models import CNN1D

PAPER_ACCURACY = 0.94  # the MNIST-1D paper's figure for this CNN (Adam 1e-2, batch 100, 6,000 steps)
REQUIRED_ACCURACY = 0.90


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps (default 6000)")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes (default: one per usable core)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0, help="initialization and shuffling seed")
    parser.add_argument("--output", default=os.path.join("runs", "demo"))
    args = parser.parse_args(argv)

    x_train, y_train, x_test, y_test = load_mnist1d()
    model = CNN1D()
    state = model.init_state(seed=args.seed)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    epochs = -(-args.steps // steps_per_epoch)
    processes = args.processes or usable_cores()
    print(f"MNIST-1D: {len(x_train)} training / {len(x_test)} test examples; CNN1D with "
          f"{state.num_params:,} parameters; {processes} processes; {epochs} epochs of "
          f"{steps_per_epoch} steps (batch {args.batch_size}, Adam lr {args.lr})")
    started = time.perf_counter()
    with ParallelBatchProcessor(model, num_processes=processes, batch_size=args.batch_size,
                                optimizer="adam", seed=args.seed) as processor:
        with tqdm(range(epochs), unit="epoch", file=sys.stdout, mininterval=1.0) as bar:
            for epoch in bar:
                state, results = processor.run_parallel(x_train, y_train, state,
                                                         {"learning_rate": args.lr})
                rate = results["examples"].sum() / results["wall_s"].sum()
                bar.set_postfix(loss=f"{results['mean_loss']:.3f}", samples_s=f"{rate:,.0f}",
                                refresh=False)
        _, evaluation = processor.run_parallel(x_test, y_test, state, {"update_weights": False})
    elapsed = time.perf_counter() - started
    accuracy = float(np.mean(evaluation["predictions"].argmax(axis=1) == y_test))

    os.makedirs(args.output, exist_ok=True)
    checkpoint = os.path.join(args.output, "mnist1d_cnn.h5")
    state.save(checkpoint, metadata={"model": "cnn1d", "steps": epochs * steps_per_epoch,
                                     "test_accuracy": accuracy, "processes": processes})
    print(f"Test accuracy: {accuracy:.4f} (the MNIST-1D paper reports {PAPER_ACCURACY:.2f} for this "
          f"CNN) after {epochs * steps_per_epoch} steps in {elapsed:.1f} s")
    print(f"Checkpoint written to {os.path.abspath(checkpoint)}")
    if accuracy < REQUIRED_ACCURACY:
        print(f"FAILED: test accuracy {accuracy:.4f} is below {REQUIRED_ACCURACY:.2f}.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
