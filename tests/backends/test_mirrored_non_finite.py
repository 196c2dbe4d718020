"""The GPU path (tf.distribute.MirroredStrategy, run here on two logical CPUs) raises the engine's
own NonFiniteLossError on a non-finite loss, as the CPU engine does (issue 10, item 9)."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {here!r})
    import numpy as np
    from engine import NonFiniteLossError
    from engine.backends.keras import KerasModel
    from engine.backends.tf_distribute import MirroredProcessor, split_cpu_into_logical_devices
    from keras_oracle import dense_dropout
    devices = split_cpu_into_logical_devices(2)
    model = KerasModel(dense_dropout)
    processor = MirroredProcessor(model, devices=devices, batch_size=8, optimizer="sgd", seed=0)
    x = np.full((8, 6), 3e38, np.float32)  # finite inputs whose logits overflow to inf
    y = np.arange(8) % 3
    try:
        processor.run_parallel(x, y, model.init_state(0), {{"learning_rate": 0.1}})
    except NonFiniteLossError as error:
        print("raised", type(error).__name__, error.step, "|", error)
    except Exception as error:
        print("raised", type(error).__name__, "|", error)
    else:
        print("raised nothing")
""")


@pytest.mark.slow
def test_a_nan_loss_on_the_gpu_path_raises_non_finite_loss_error_not_type_error():
    here = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.run([sys.executable, "-c", _SCRIPT.format(root=ROOT, here=here)],
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert child.returncode == 0, child.stderr[-3000:]
    line = child.stdout.strip().splitlines()[-1]
    assert line.startswith("raised NonFiniteLossError 0 |"), line
    assert "not finite at step 0" in line
