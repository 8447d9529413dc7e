"""A sample upstream for trying a standalone gateway: answers every request with who it is and what it saw.

python examples/hello_service.py --port 9101 [--version v1]
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    version = "v1"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        body = (
            json.dumps(
                {
                    "service": "hello",
                    "version": self.version,
                    "path": self.path,
                    "request_id": self.headers.get("x-request-id"),
                },
                indent=1,
            ).encode()
            + b"\n"
        )
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--version", default="v1", help="what the answers say this instance is")
    args = parser.parse_args()
    Hello.version = args.version
    ThreadingHTTPServer(("127.0.0.1", args.port), Hello).serve_forever()


if __name__ == "__main__":
    main()
