"""A rank that never finishes: for testing that a launch timeout kills every process.

Usage: ``hang_worker.py PIDFILE_PREFIX`` writes ``PREFIX.<pid>`` and blocks until killed.
Imports nothing heavy so it starts at once under any launcher.
"""

import os
import signal
import sys

with open(f"{sys.argv[1]}.{os.getpid()}", "w") as f:
    f.write(str(os.getpid()))
os.write(sys.stdout.fileno(), f"HANGING pid={os.getpid()}\n".encode())
while True:
    signal.pause()
