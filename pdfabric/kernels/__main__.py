"""``python -m pdfabric.kernels --bench``: see ``pdfabric.kernels.bench``."""

from __future__ import annotations

import sys

from pdfabric.kernels.bench import main

sys.exit(main())
