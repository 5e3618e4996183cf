"""`python -m tests.support.peak_rss REPORT COMMAND...`: run COMMAND, write its peak resident
set size in bytes to REPORT, exit with its status.

The kernel keeps the high-water mark of every waited-for child (getrusage RUSAGE_CHILDREN);
this wrapper has only the one child, so the figure is that command's alone, however many
other processes the test run has started."""

import resource
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    code = subprocess.call(sys.argv[2:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    Path(sys.argv[1]).write_text(str(peak_kib * 1024))
    sys.exit(code)
