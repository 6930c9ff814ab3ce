import os
import sys

# Tests import the top-level modules (model.py, vision.py, ...) the way the scripts do.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
