"""Backends: where a model's maths runs. Importing this package never imports TensorFlow.

``KerasModel`` runs a Keras model inside the engine's CPU worker processes; ``MirroredProcessor``
runs it under ``tf.distribute.MirroredStrategy`` (GPUs) behind the processor's interface;
``make_processor`` picks one of the two for a device request and ``describe_device_path`` says
which and why.
"""
from engine.backends.device import describe_device_path, make_processor, visible_gpus
from engine.backends.keras import KerasModel, in_tensorflow_process, tensorflow_available
from engine.backends.tf_distribute import MirroredProcessor, split_cpu_into_logical_devices

__all__ = ["KerasModel", "MirroredProcessor", "describe_device_path", "in_tensorflow_process",
           "make_processor", "split_cpu_into_logical_devices", "tensorflow_available",
           "visible_gpus"]
