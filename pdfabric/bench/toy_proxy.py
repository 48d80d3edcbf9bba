"""The ``toy`` row of the proxy benchmark: a minimal sequential P/D proxy in the manner of
vLLM's ``toy_proxy_server.py`` (FastAPI + httpx, served by uvicorn).

Per request: the prefill leg (``max_tokens=1``, ``stream=false``, with produce
``kv_transfer_params``) and wait for its JSON; then the decode leg carrying the prefill's
``kv_transfer_params``, its bytes passed through as they come (a ``StreamingResponse``,
streaming or not, like the original). Differences from the original, both in its favour:
no per-request access log, and connection pools without limits. The produce parameters are
pdfabric's (``{"pdfabric": "produce", ...}``) so the fake prefill engine answers real
``kv_transfer_params`` that the decode leg then carries.

    python -m pdfabric.bench.toy_proxy --port 8000 --prefill http://127.0.0.1:8100 \\
        --decode http://127.0.0.1:8200
"""

from __future__ import annotations

import argparse
import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse

__all__ = ["make_app", "main"]


def make_app(prefills: list[str], decodes: list[str]) -> FastAPI:
    clients: dict[str, list[httpx.AsyncClient]] = {}
    turn = {"prefill": itertools.count(), "decode": itertools.count()}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        for role, urls in (("prefill", prefills), ("decode", decodes)):
            clients[role] = [httpx.AsyncClient(timeout=None, base_url=u + "/v1", limits=limits) for u in urls]
        yield
        for cs in clients.values():
            for c in cs:
                await c.aclose()

    def pick(role: str) -> httpx.AsyncClient:
        cs = clients[role]
        return cs[next(turn[role]) % len(cs)]

    async def handle(api: str, request: Request) -> Any:
        try:
            req: dict[str, Any] = await request.json()
            rid = str(uuid.uuid4())
            headers = {"X-Request-Id": rid}
            p_req = {k: v for k, v in req.items() if k != "stream_options"}
            p_req.update(stream=False, max_tokens=1, kv_transfer_params={"pdfabric": "produce", "transfer_id": rid})
            if "max_completion_tokens" in p_req:
                p_req["max_completion_tokens"] = 1
            resp = await pick("prefill").post(api, json=p_req, headers=headers)
            resp.raise_for_status()
            kv = resp.json().get("kv_transfer_params") or {}
            if kv:
                req["kv_transfer_params"] = kv
            decode = pick("decode")

            async def relay() -> AsyncIterator[bytes]:
                async with decode.stream("POST", api, json=req, headers=headers) as r:
                    r.raise_for_status()
                    async for chunk in r.aiter_bytes():
                        yield chunk

            return StreamingResponse(relay(), media_type="application/json")
        except Exception as e:  # the original prints the traceback and re-raises (a 500)
            return JSONResponse({"error": {"message": repr(e), "type": "proxy_error"}}, status_code=500)

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle("/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle("/chat/completions", request)

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdfabric.bench.toy_proxy", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefill", action="append", required=True, metavar="URL")
    ap.add_argument("--decode", action="append", required=True, metavar="URL")
    args = ap.parse_args(argv)
    import uvicorn

    print(f"toy proxy on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(make_app(args.prefill, args.decode), host=args.host, port=args.port, log_level="warning",
                access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
