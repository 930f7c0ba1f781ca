"""A shard server that drops every shard's first connection mid-body: python's http.server, except that
the first GET of each .tar sends the full Content-Length and then only `--cut` bytes before it closes
the connection (what a reader sees when a server or a proxy dies mid-shard, made repeatable). With
`--ranges` it also answers `Range: bytes=N-` with 206, as nginx does; python's http.server ignores Range.

    python tests/support/shard_server.py DIRECTORY PORT --cut BYTES [--ranges]

Prints `ready` on stdout once it listens."""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class CuttingHandler(SimpleHTTPRequestHandler):
    cut = 0
    ranges = False
    seen: set[str] = set()
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads only `ready` from this process."""

    def do_GET(self) -> None:
        path = self.translate_path(self.path)
        if not path.endswith(".tar") or not os.path.isfile(path):
            return super().do_GET()
        with self.lock:
            first = path not in self.seen
            self.seen.add(path)
        size = os.path.getsize(path)
        wanted = self.headers.get("Range", "")
        start = int(wanted[len("bytes=") : -1]) if self.ranges and wanted.startswith("bytes=") else 0
        with open(path, "rb") as f:
            f.seek(start)
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if first:
                self.wfile.write(f.read(self.cut))
                self.wfile.flush()
                self.close_connection = True
                return
            shutil.copyfileobj(f, self.wfile)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("port", type=int)
    parser.add_argument("--cut", type=int, required=True)
    parser.add_argument("--ranges", action="store_true")
    args = parser.parse_args()
    CuttingHandler.cut, CuttingHandler.ranges = args.cut, args.ranges
    handler = functools.partial(CuttingHandler, directory=args.directory)
    with ThreadingHTTPServer(("127.0.0.1", args.port), handler) as server:
        print("ready", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
