"""Always-clean stand-ins for clamd (INSTREAM) and spamd (SPAMC), for benchmarks only:
they let bench/filter_bench.py measure what the relay itself costs.

    python bench/stand_in_scanners.py CLAMD_PORT SPAMD_PORT
"""

from __future__ import annotations

import asyncio
import struct
import sys


async def clamd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """zINSTREAM, alone or in a zIDSESSION (replies numbered) until zEND or end of input."""
    session = await reader.readuntil(b"\0") == b"zIDSESSION\0"
    number = 0
    try:
        while True:
            if session and await reader.readuntil(b"\0") == b"zEND\0":
                break
            while (size := struct.unpack(">I", await reader.readexactly(4))[0]) > 0:
                await reader.readexactly(size)
            number += 1
            writer.write(f"{number}: stream: OK\0".encode() if session else b"stream: OK\0")
            if not session:
                break
    except asyncio.IncompleteReadError:
        pass  # the client hung up
    writer.close()


async def spamd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # the request, up to the client's end of input
    writer.write(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\nSpam: False ; 0.0 / 5.0\r\n\r\n")
    writer.close()


async def main(clamd_port: int, spamd_port: int) -> None:
    await asyncio.start_server(clamd, "127.0.0.1", clamd_port)
    await asyncio.start_server(spamd, "127.0.0.1", spamd_port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
