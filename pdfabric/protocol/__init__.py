"""The control plane: typed messages (``messages``), HMAC envelopes (``auth``) and the
pure transfer state machines of both ends (``producer``, ``consumer``)."""

from pdfabric.protocol.messages import WIRE_VERSION

__all__ = ["WIRE_VERSION"]
