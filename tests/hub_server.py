"""A loopback Hugging Face Hub-compatible HTTP server for tests (127.0.0.1 only, no auth, models only).

It answers what `huggingface_hub` calls to push and pull a model repo:

    POST /api/repos/create                          create a repo (409 when it exists, `exist_ok` handles it)
    POST /api/validate-yaml                         parse the README front matter (400 with errors when invalid)
    POST /api/models/{repo}/preupload/{rev}          every file is uploaded "regular" (inline base64)
    POST /api/models/{repo}/commit/{rev}             NDJSON commit: header, file, deletedFile, deletedFolder
    GET  /api/models/{repo}[/revision/{rev}]         repo info with siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]      file listing
    HEAD/GET /{repo}/resolve/{rev}/{path}            file metadata (X-Repo-Commit, ETag, size) and bytes;
                                                     404 + X-Error-Code: EntryNotFound for a missing file,
                                                     RepoNotFound for a missing repo

Repos live on disk under `root/{org}/{name}/` (files) with `root/{org}/{name}.json` (commit sha, history), so a
test can look at exactly what was written. Every request is logged in `server.requests` as (method, path).

Use from a test (the clients must run in a subprocess with HF_ENDPOINT set before huggingface_hub is imported):

    with HubServer(tmp_path / "hub") as hub:
        env = hub.client_env(home=tmp_path / "home")
        subprocess.run([sys.executable, "script.py"], env=env, check=True)

or by hand: `python tests/hub_server.py --root /tmp/hub --port 8765`, then `HF_ENDPOINT=http://127.0.0.1:8765`.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock = threading.Lock()

    def _meta_path(self, repo: str) -> Path:
        return self.root / f"{repo}.json"

    def files_dir(self, repo: str) -> Path:
        return self.root / repo

    def exists(self, repo: str) -> bool:
        return self._meta_path(repo).is_file()

    def meta(self, repo: str) -> dict:
        return json.loads(self._meta_path(repo).read_text())

    def create(self, repo: str) -> bool:
        with self.lock:
            if self.exists(repo):
                return False
            self.files_dir(repo).mkdir(parents=True, exist_ok=True)
            sha = hashlib.sha1(f"init {repo} {time.time()}".encode()).hexdigest()
            self._meta_path(repo).write_text(json.dumps({"sha": sha, "commits": [{"sha": sha, "summary": "initial"}]}))
            return True

    def list_files(self, repo: str) -> list[str]:
        base = self.files_dir(repo)
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def commit(self, repo: str, summary: str, adds: dict[str, bytes], deletes: list[str], folders: list[str]) -> str:
        with self.lock:
            base = self.files_dir(repo)
            for path, data in adds.items():
                target = base / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            for path in deletes:
                (base / path).unlink(missing_ok=True)
            for folder in folders:
                for p in sorted((base / folder).rglob("*"), reverse=True):
                    p.unlink() if p.is_file() else p.rmdir()
            meta = self.meta(repo)
            sha = hashlib.sha1((meta["sha"] + summary + json.dumps(sorted(adds)) + str(time.time())).encode()).hexdigest()
            meta["sha"] = sha
            meta["commits"].append({"sha": sha, "summary": summary, "files": sorted(adds)})
            self._meta_path(repo).write_text(json.dumps(meta))
            return sha


class _Handler(BaseHTTPRequestHandler):
    server_version = "LoopbackHub/1.0"
    protocol_version = "HTTP/1.1"

    # ------------------------------------------------------------------ helpers
    @property
    def store(self) -> _Store:
        return self.server.store

    def log_message(self, format, *args):  # quiet
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None, head=False):
        if body is None:
            body = json.dumps(payload if payload is not None else {}).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head=False, extra: dict | None = None):
        self._send(status, {"error": message}, headers={"X-Error-Code": code, "X-Error-Message": message, **(extra or {})},
                   head=head)

    def _endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _route(self, method: str):
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append((method, path))
        for pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, path)
            if match and name.startswith(method.lower() + "_"):
                return getattr(self, name)(**match.groupdict())
            if match and method == "HEAD" and name.startswith("get_"):
                return getattr(self, name)(head=True, **match.groupdict())
        self._error(404, "NotFound", f"no route for {method} {path}")

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def _check_repo(self, repo: str, head=False) -> bool:
        if not self.store.exists(repo):
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.", head=head)
            return False
        return True

    # ------------------------------------------------------------------ endpoints
    ROUTES = [
        (r"/api/repos/create", "post_create"),
        (r"/api/validate-yaml", "post_validate_yaml"),
        (rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "post_preupload"),
        (rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "post_commit"),
        (rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", "get_tree"),
        (rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", "get_info"),
        (rf"/api/models/{_REPO}", "get_info"),
        (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "get_resolve"),
    ]

    def post_create(self):
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") not in (None, "model"):
            return self._error(400, "BadRequest", "this loopback hub only hosts model repos")
        name, org = payload.get("name"), payload.get("organization")
        repo = f"{org}/{name}" if org else name
        url = f"{self._endpoint()}/{repo}"
        if not self.store.create(repo):
            return self._send(409, {"error": "You already created this model repo", "url": url},
                              headers={"X-Error-Code": "RepoExists"})
        self._send(200, {"url": url, "name": repo, "id": repo})

    def post_validate_yaml(self):
        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, flags=re.S)
        if match is None:
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return self._send(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
        if data is not None and not isinstance(data, dict):
            return self._send(400, {"errors": [{"message": "YAML metadata must be a mapping"}]})
        self._send(200, {"errors": [], "warnings": []})

    def post_preupload(self, repo, rev):
        if not self._check_repo(repo):
            return
        payload = json.loads(self._body() or b"{}")
        base = self.store.files_dir(repo)
        files = []
        for item in payload.get("files", []):
            existing = base / item["path"]
            oid = git_blob_sha1(existing.read_bytes()) if existing.is_file() else None
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files, "commitOid": self.store.meta(repo)["sha"]})

    def post_commit(self, repo, rev):
        if not self._check_repo(repo):
            return
        adds, deletes, folders, summary = {}, [], [], ""
        for line in self._body().decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, "BadRequest", f"unsupported encoding {value.get('encoding')!r}")
                adds[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deletes.append(value["path"])
            elif key == "deletedFolder":
                folders.append(value["path"])
            else:
                return self._error(400, "BadRequest", f"unsupported commit operation {key!r} (only regular files)")
        sha = self.store.commit(repo, summary, adds, deletes, folders)
        self._send(200, {"commitUrl": f"{self._endpoint()}/{repo}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None})

    def get_info(self, repo, rev="main", head=False):
        if not self._check_repo(repo, head):
            return
        meta = self.store.meta(repo)
        base = self.store.files_dir(repo)
        siblings = [{"rfilename": f, "size": (base / f).stat().st_size} for f in self.store.list_files(repo)]
        info = {"id": repo, "modelId": repo, "sha": meta["sha"], "private": False, "disabled": False,
                "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z"}
        self._send(200, info, head=head)

    def get_tree(self, repo, rev, sub=None, head=False):
        if not self._check_repo(repo, head):
            return
        base = self.store.files_dir(repo)
        prefix = (sub or "").strip("/")
        entries = []
        for f in self.store.list_files(repo):
            if prefix and not f.startswith(prefix + "/"):
                continue
            data = (base / f).read_bytes()
            entries.append({"type": "file", "path": f, "size": len(data), "oid": git_blob_sha1(data)})
        self._send(200, entries, head=head)

    def get_resolve(self, repo, rev, file, head=False):
        if not self._check_repo(repo, head):
            return
        sha = self.store.meta(repo)["sha"]
        if rev not in ("main", sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head, extra={})
        target = self.store.files_dir(repo) / file
        if not target.is_file():
            return self._error(404, "EntryNotFound", f"{file} does not exist on {rev}", head=head,
                               extra={"X-Repo-Commit": sha})
        data = target.read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream",
                   "Accept-Ranges": "bytes"}
        self._send(200, headers=headers, body=data, head=head)


class HubServer:
    """Threaded loopback hub on 127.0.0.1 (port 0 = any free port). A context manager."""

    def __init__(self, root, port: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.store = _Store(self.root)
        self.httpd.requests = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list:
        return self.httpd.requests

    def repo_files(self, repo: str) -> list[str]:
        return self.httpd.store.list_files(repo) if self.httpd.store.exists(repo) else []

    def client_env(self, home, **extra) -> dict:
        """Environment for a client subprocess: this endpoint, an isolated HF_HOME, online, a dummy token."""
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=self.endpoint, HF_HOME=str(home), HF_TOKEN="hf_loopback_dummy_token",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="30",
                   HF_HUB_DOWNLOAD_TIMEOUT="30")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    server = HubServer(args.root, args.port)
    print(f"serving {server.endpoint} from {server.root}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
