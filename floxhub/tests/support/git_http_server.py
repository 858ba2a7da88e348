#!/usr/bin/env python3
"""A FloxHub stand-in for tests: serves bare git repositories under --root over git's smart HTTP
protocol by running the real `git http-backend` as a CGI program, with HTTP basic auth (user
`oauth`, the token as password) required for the owners given with --private OWNER:TOKEN.

Prints the port it listens on (127.0.0.1) as its first line of stdout, then serves until killed.
Python's standard library only: http.server + subprocess.
"""

import argparse
import base64
import http.server
import os
import subprocess
import sys
import threading


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--private", action="append", default=[], help="OWNER:TOKEN")
    args = ap.parse_args()
    private = {}
    for p in args.private:
        owner, token = p.split(":", 1)
        private[owner] = token
    root = os.path.abspath(args.root)
    lock = threading.Lock()
    requests = open(os.path.join(root, "requests.log"), "a", buffering=1)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):  # keep stderr quiet; log paths to a file
            pass

        def do_GET(self):
            self.handle_git()

        def do_POST(self):
            self.handle_git()

        def read_body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def deny(self, code):
            self.send_response(code)
            self.send_header("WWW-Authenticate", 'Basic realm="floxhub"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def handle_git(self):
            path, _, query = self.path.partition("?")
            owner = path.lstrip("/").split("/", 1)[0]
            with lock:
                requests.write(f"{self.command} {path}\n")
            if owner in private:
                auth = self.headers.get("Authorization")
                if auth is None:
                    return self.deny(401)
                expected = "Basic " + base64.b64encode(
                    f"oauth:{private[owner]}".encode()).decode()
                if auth != expected:
                    return self.deny(403)
            body = self.read_body()
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": root,
                "GIT_HTTP_EXPORT_ALL": "1",
                "GATEWAY_INTERFACE": "CGI/1.1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_ADDR": self.client_address[0],
                "REMOTE_USER": "oauth" if owner in private else "",
            }
            if self.headers.get("Git-Protocol"):
                env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
            if self.headers.get("Content-Encoding"):
                env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
            proc = subprocess.run(["git", "http-backend"], input=body, env=env,
                                  capture_output=True)
            head, _, out = proc.stdout.partition(b"\r\n\r\n")
            if not _:
                head, _, out = proc.stdout.partition(b"\n\n")
            status = 200
            headers = []
            for line in head.decode("latin-1").splitlines():
                if not line.strip():
                    continue
                k, _, v = line.partition(":")
                if k.lower() == "status":
                    status = int(v.strip().split()[0])
                else:
                    headers.append((k.strip(), v.strip()))
            if proc.returncode != 0 and status == 200:
                status = 500
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
