import os
import sys

# Shared, reproducible CPU settings for every test process.
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(__file__))
