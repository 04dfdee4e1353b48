"""The baseline: a pass-through proxy a developer would write in ~30 lines (aiohttp + uvloop).

One pooled ClientSession; streams request and response bodies; drops hop-by-hop headers.
    python bench/minimal_proxy.py --target http://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


async def main(target: str, host: str, port: int) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200), auto_decompress=False)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        data = request.content if request.can_read_body else None
        async with session.request(
            request.method, target + request.path_qs, headers=headers, data=data, allow_redirects=False
        ) as up:
            resp = web.StreamResponse(
                status=up.status, headers={k: v for k, v in up.headers.items() if k.lower() not in HOP}
            )
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    runner = web.ServerRunner(web.Server(handle), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    print(f"minimal proxy listening on {runner.addresses[0][0]}:{runner.addresses[0][1]}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    uvloop.run(main(a.target.rstrip("/"), a.host, a.port))
