"""The proxy's prompt text per API, from which it estimates tokens and hashes prefixes:
every text a request carries counts, whatever the item's shape."""

from __future__ import annotations

import pytest

from pdfabric.proxy.legs import CHAT, COMPLETIONS, MESSAGES, RESPONSES
from pdfabric.proxy.policy import estimate_tokens
from pdfabric.proxy.server import _prompt_of

BIG = "tool output " * 3000  # ~36 KB


@pytest.mark.parametrize("path,body", [
    (COMPLETIONS, {"prompt": BIG}),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": BIG}]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": BIG}]}]}),
    (RESPONSES, {"input": BIG}),
    (RESPONSES, {"input": [{"type": "function_call_output", "call_id": "c1", "output": BIG}]}),
    (RESPONSES, {"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": BIG}]}),
    (MESSAGES, {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                           "content": BIG}]}]}),
    (MESSAGES, {"system": BIG, "messages": [{"role": "user", "content": "hi"}]}),
], ids=["completion", "chat-tool", "chat-parts", "responses-text", "responses-tool-output",
        "responses-tool-call", "messages-tool-result", "messages-system"])
def test_every_text_of_a_request_counts(path: str, body: dict[str, object]) -> None:
    assert estimate_tokens(_prompt_of(body, path)) >= estimate_tokens(BIG)


def test_responses_instructions_count() -> None:
    assert BIG in _prompt_of({"instructions": BIG, "input": "hi"}, RESPONSES)
