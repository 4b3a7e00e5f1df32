"""Local HTTP servers for the tests: one speaking the parts of the VirusTotal
v3 API picosnitch uses, one serving files (the GeoIP download). Both listen on
127.0.0.1 only and record the requests they get."""
import email.parser
import email.policy
import hashlib
import http.server
import json
import threading
import time

API_KEY = "vt-test-key-0123456789abcdef"
FLAG_MARK = b"PICOSNITCH-TEST-MALWARE"      # uploaded files containing this are judged malicious


def stats(malicious=0, suspicious=0, harmless=0, undetected=70):
    return {"malicious": malicious, "suspicious": suspicious, "harmless": harmless, "undetected": undetected,
            "timeout": 0, "type-unsupported": 0, "failure": 0}


class Server:
    """A threading HTTP server on a free loopback port running `handler`."""

    def __init__(self, handler):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def do_GET(self):
                owner.requests.append((time.monotonic(), "GET", self.path, dict(self.headers)))
                handler(self, "GET")

            def do_POST(self):
                owner.requests.append((time.monotonic(), "POST", self.path, dict(self.headers)))
                handler(self, "POST")

        self.requests = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(req, status, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req.send_response(status)
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)


class FakeVirusTotal:
    """/api/v3/files/{sha256}, /api/v3/files (upload), /api/v3/analyses/{id}.
    `known` maps sha256 -> stats; an upload becomes an analysis that is queued
    on the first look and completed on the next."""

    def __init__(self):
        self.known, self.uploads, self.analyses = {}, {}, {}
        self.server = Server(self.handle)
        self.base = f"http://127.0.0.1:{self.server.port}/api/v3"

    def handle(self, req, method):
        if req.headers.get("x-apikey") != API_KEY:
            return reply(req, 401, {"error": {"code": "WrongCredentialsError", "message": "Wrong API key"}})
        path = req.path.split("?")[0]
        if method == "GET" and path.startswith("/api/v3/files/"):
            sha = path.rsplit("/", 1)[1]
            if sha in self.known:
                return reply(req, 200, {"data": {"id": sha, "type": "file",
                                                 "attributes": {"last_analysis_stats": self.known[sha]}}})
            return reply(req, 404, {"error": {"code": "NotFoundError", "message": f"File \"{sha}\" not found"}})
        if method == "POST" and path == "/api/v3/files":
            return self.upload(req)
        if method == "GET" and path.startswith("/api/v3/analyses/"):
            return self.analysis(req, path.rsplit("/", 1)[1])
        reply(req, 404, {"error": {"code": "NotFoundError", "message": path}})

    def upload(self, req):
        body = req.rfile.read(int(req.headers["Content-Length"]))
        head = f"Content-Type: {req.headers['Content-Type']}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        data = next(part.get_payload(decode=True) for part in message.iter_parts()
                    if part.get_param("name", header="content-disposition") == "file")
        sha = hashlib.sha256(data).hexdigest()
        analysis = f"analysis-{len(self.analyses) + 1}"
        self.uploads[sha] = data
        self.analyses[analysis] = [sha, 0]
        reply(req, 200, {"data": {"type": "analysis", "id": analysis}})

    def analysis(self, req, analysis):
        if analysis not in self.analyses:
            return reply(req, 404, {"error": {"code": "NotFoundError", "message": analysis}})
        sha, looks = self.analyses[analysis]
        self.analyses[analysis][1] += 1
        if looks == 0:
            return reply(req, 200, {"data": {"id": analysis, "attributes": {"status": "queued", "stats": stats(0, 0, 0, 0)}}})
        verdict = stats(malicious=5) if FLAG_MARK in self.uploads[sha] else stats()
        self.known[sha] = verdict
        reply(req, 200, {"data": {"id": analysis, "attributes": {"status": "completed", "stats": verdict}}})

    def close(self):
        self.server.close()


class FileServer:
    """Serves `files` (path -> bytes); anything else is 404."""

    def __init__(self, files):
        self.files = files
        self.server = Server(self.handle)
        self.base = f"http://127.0.0.1:{self.server.port}"

    def handle(self, req, method):
        if req.path in self.files:
            return reply(req, 200, self.files[req.path])
        reply(req, 404, b"not found")

    def close(self):
        self.server.close()

