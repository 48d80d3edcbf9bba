"""pdfabric's vLLM KV connector (``pdfabric.connector.vllm.PDFabricConnector``).

Importing this package does not import vLLM; only ``pdfabric.connector.vllm`` does.
"""

__all__: list[str] = []
