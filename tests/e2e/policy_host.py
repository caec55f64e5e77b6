"""The tests' MTA-STS policy host: https://mta-sts.<domain>/.well-known/mta-sts.txt for
each folder of tests/e2e/mta-sts (named after its host), with a certificate from the
tests' CA. Run in a container of the test stack:

    python policy_host.py POLICIES CERT KEY
"""

from __future__ import annotations

import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

POLICIES = Path(sys.argv[1])


class PolicyHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        host = self.headers.get("Host", "").split(":")[0].lower()
        policy = POLICIES / host / "mta-sts.txt"
        if self.path != "/.well-known/mta-sts.txt" or "/" in host or not policy.is_file():
            self.send_error(404)
            return
        body = policy.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    server = ThreadingHTTPServer(("0.0.0.0", 443), PolicyHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
