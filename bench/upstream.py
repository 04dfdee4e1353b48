"""A fast loopback upstream for the overhead benchmark (aiohttp + uvloop).

Any path ending in ``/stream?size=N`` answers N bytes streamed in 64 KiB chunks;
``POST .../sink`` reads and discards the request body and answers its length;
everything else answers a tiny JSON body. Prints ``listening on HOST:PORT``.

    python bench/upstream.py [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop
from aiohttp import web

TINY = b'{"id":"ch_1","object":"charge","ok":true}'
CHUNK = b"x" * 65536


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    path = request.path
    if path.endswith("/stream"):
        size = int(request.query.get("size", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        left = size
        while left > 0:
            piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
            await resp.write(piece)
            left -= len(piece)
        await resp.write_eof()
        return resp
    if path.endswith("/sink"):
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.Response(body=b'{"received":%d}' % total, content_type="application/json")
    if request.can_read_body:
        await request.read()
    return web.Response(body=TINY, content_type="application/json")


async def main(host: str, port: int) -> None:
    runner = web.ServerRunner(web.Server(handle), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0]
    print(f"upstream listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port))
