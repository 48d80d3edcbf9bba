"""Benchmarks shipped with pdfabric (``pdfabric bench ...``)."""
