"""Set-up of the TensorFlow/Keras test process (``pytest tests_keras``, never mixed with ``tests``).

Importing triton after TensorFlow crashes a process, so no torch-compile path is imported here;
tests on Keras's PyTorch backend run in subprocesses.

The SignSGD test plugin of ``tests/plugin_fixture.py`` is installed on ``sys.path`` before the
registry is first read, so every test that iterates over the Keras-capable registry optimizers
covers a third-party plugin as well as the built-ins.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(__file__))

import keras_helpers

PLUGIN_DIR = keras_helpers.plugin_fixture.write_plugin(tempfile.mkdtemp(prefix="ano-keras-plugin-"))
atexit.register(shutil.rmtree, PLUGIN_DIR, ignore_errors=True)
sys.path.insert(0, PLUGIN_DIR)
os.environ[keras_helpers.PLUGIN_DIR_ENV] = PLUGIN_DIR
