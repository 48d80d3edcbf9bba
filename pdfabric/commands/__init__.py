"""CLI subcommands; see ``pdfabric.cli``."""
