"""Transfer bandwidth and latency of pdfabric transports against same-run baselines.

Same as ``pdfabric bench transfer``; e.g.
    python benchmarks/transfer_bandwidth.py --transport tcp,shm --size 64MiB,256MiB \
        --block-size 64KiB,256KiB,2MiB --rounds 5 --json out.json --plot out.png
"""

import sys

from pdfabric.commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
