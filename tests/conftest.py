import os
import sys

# One thread: the test models are tiny, and OpenMP fork/join costs more than it saves there.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
