"""``pdfabric launch``: plan (``plan.py``), preflight, run (``runner.py``), post-start
checks and the demo client."""

__all__: list[str] = []
