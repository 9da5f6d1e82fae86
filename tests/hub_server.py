"""A loopback stand-in for the part of the Hugging Face Hub HTTP API that huggingface_hub 2.x calls for
push, pull and search (with HF_HUB_DISABLE_XET=1), so that the tests drive the real client.

Repos live in memory: each branch points at a commit, each commit is a full {path: bytes} tree. Files with
a binary extension (or over 10 MiB) go through the LFS protocol, the rest inline in the commit, as on the
Hub. Knobs for the tests: users and tokens, private repos, a file served with one byte flipped, a download
cut midway N times, and a log of every request (to prove what was, and was not, downloaded).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".st", ".png", ".ckpt")
LFS_THRESHOLD = 10 << 20


def git_blob_sha1(data: bytes) -> str:
    """What git (and the Hub, for files kept in git) calls the file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    last_modified: str = ""
    downloads: int = 0

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class HubServer:
    """`with HubServer(tokens={"hf_x": "alice"}) as hub:` serves on hub.url until the block ends."""

    tokens: dict[str, str] = field(default_factory=dict)  # token -> user name
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    corrupt: set[tuple[str, str]] = field(default_factory=set)  # (repo_id, path) served with one byte flipped
    cuts: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo_id, path) -> downloads still to cut
    log: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path, headers)
    _counter: int = 0

    def __enter__(self) -> HubServer:
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------ state the tests set up or inspect

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self._lock:
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            self._commit(repo, "main", {".gitattributes": b"*.pth filter=lfs diff=lfs merge=lfs -text\n"}, [])
            return repo

    def add_file(self, repo_id: str, path: str, data: bytes, private: bool = False) -> str:
        """Put a file straight into a repo (e.g. a base model), creating the repo if needed; returns the commit."""
        if repo_id not in self.repos:
            self.create_repo(repo_id, private)
        with self._lock:
            if is_lfs(path, len(data)):
                self.lfs_objects[hashlib.sha256(data).hexdigest()] = data
            return self._commit(self.repos[repo_id], "main", {path: data}, [])

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(revision, revision)]

    def requests(self, method: str, contains: str = "") -> list[str]:
        return [path for m, path, _ in self.log if m == method and contains in path]

    def _commit(self, repo: Repo, branch: str, added: dict[str, bytes], deleted: list[str]) -> str:
        self._counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{self._counter}".encode()).hexdigest()
        parent = repo.commits.get(repo.branches.get(branch, ""), {})
        tree = {p: d for p, d in parent.items() if p not in deleted}
        tree.update(added)
        repo.commits[oid] = tree
        repo.branches[branch] = oid
        repo.last_modified = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return oid


class _Refusal(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - keep the test output clean
        pass

    # ------------------------------------------------------------ plumbing

    def _route(self, method: str) -> None:
        split = urlsplit(self.path)
        path, self.query = unquote(split.path), parse_qs(split.query)
        wanted = {k.title(): v for k, v in self.headers.items() if k.lower() in ("range", "authorization")}
        self.hub.log.append((method, path, wanted))
        try:
            self.user = self._user()
            for pattern, handler in ROUTES[method]:
                m = re.fullmatch(pattern, path)
                if m:
                    return handler(self, **m.groupdict())
            raise _Refusal(404, f"no route {method} {path}")
        except _Refusal as r:
            headers = dict(r.headers)
            if r.code:
                headers["X-Error-Code"] = r.code
            headers["X-Error-Message"] = r.message
            self._json({"error": r.message}, r.status, headers, body=method != "HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, data: bytes, headers: dict | None = None, body: bool = True,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _json(self, obj, status: int = 200, headers: dict | None = None, body: bool = True) -> None:
        self._send(status, json.dumps(obj).encode(), headers, body)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise _Refusal(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        """The repo if this caller may see it (and write to it); the Hub's answers otherwise."""
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self.user != repo.owner):
            raise _Refusal(401 if self.user is None else 404, "Repository not found", "RepoNotFound")
        if write and self.user is None:
            raise _Refusal(401, "You must be authenticated to write to this repo")
        if write and self.user != repo.owner:
            raise _Refusal(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_oid(self, repo: Repo, revision: str) -> str:
        revision = unquote(revision)
        oid = repo.branches.get(revision, revision if revision in repo.commits else None)
        if oid is None:
            raise _Refusal(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    # ------------------------------------------------------------ the API

    def create_repo(self) -> None:
        body = json.loads(self._body())
        owner = body.get("organization") or self.user
        if self.user is None:
            raise _Refusal(401, "You must be authenticated to create a repo")
        if owner != self.user:
            raise _Refusal(403, f"You don't have the rights to create a model under the namespace \"{owner}\"")
        repo_id = f"{owner}/{body['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json({"error": "You already created this model repo", "url": url}, 409)
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.hub.create_repo(repo_id, private)
        self._json({"url": url, "name": repo_id})

    def create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id, write=True)
        self._body()
        if branch in repo.branches:
            raise _Refusal(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = repo.branches["main"]
        self._json({})

    def validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        m = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as e:
            raise _Refusal(400, f"Invalid YAML in README.md: {e}") from None
        self._json({"errors": [], "warnings": []})

    def preupload(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        tree = repo.commits[self._commit_oid(repo, revision)]
        answers = []
        for f in json.loads(self._body())["files"]:
            lfs = is_lfs(f["path"], f["size"])
            old = tree.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old))
            answers.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        self._json({"files": answers, "commitOid": repo.branches.get(unquote(revision))})

    def lfs_batch(self, repo_id: str) -> None:
        self._repo(repo_id, write=True)
        body = json.loads(self._body())
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_objects:
                href = f"{self.hub.url}/lfs-upload/{obj['oid']}?size={obj['size']}"
                entry["actions"] = {"upload": {"href": href, "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Refusal(400, "uploaded content does not match its oid")
        self.hub.lfs_objects[oid] = data
        self._send(200, b"")

    def commit(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        branch = unquote(revision)
        self._commit_oid(repo, branch)
        added, deleted = {}, []
        for line in self._body().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise _Refusal(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                added[value["path"]] = self.hub.lfs_objects[value["oid"]]
            elif item["key"] == "deletedFile":
                deleted.append(value["path"])
        with self.hub._lock:
            oid = self.hub._commit(repo, branch, added, deleted)
        self._json({"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True,
                    "pullRequestUrl": None})

    def _card_data(self, tree: dict[str, bytes]) -> dict:
        m = re.match(rb"---\n(.*?)\n---\n", tree.get("README.md", b""), re.S)
        data = yaml.safe_load(m.group(1)) if m else None
        return data if isinstance(data, dict) else {}

    def _info(self, repo: Repo, oid: str, blobs: bool) -> dict:
        tree = repo.commits[oid]
        card = self._card_data(tree)
        tags = [t for t in card.get("tags") or [] if isinstance(t, str)]
        if isinstance(card.get("base_model"), str):
            tags.append(f"base_model:{card['base_model']}")
        siblings = []
        for path, data in sorted(tree.items()):
            sib: dict = {"rfilename": path}
            if blobs:
                sib.update(size=len(data), blobId=git_blob_sha1(data))
                if is_lfs(path, len(data)):
                    sib["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(sib)
        return {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.owner, "sha": oid, "private": repo.private, "gated": False,
                "disabled": False, "downloads": repo.downloads, "likes": 0, "tags": tags, "cardData": card,
                "lastModified": repo.last_modified, "createdAt": repo.last_modified, "siblings": siblings,
                "library_name": card.get("library_name")}

    def model_info(self, repo_id: str, revision: str = "main") -> None:
        repo = self._repo(repo_id)
        self._json(self._info(repo, self._commit_oid(repo, revision), "blobs" in self.query))

    def list_models(self) -> None:
        wanted = self.query.get("filter", [])
        search = (self.query.get("search") or [""])[0].lower()
        author = (self.query.get("author") or [None])[0]
        limit = int((self.query.get("limit") or ["1000"])[0])
        out = []
        for repo in self.hub.repos.values():
            if repo.private and self.user != repo.owner:
                continue
            info = self._info(repo, repo.branches["main"], False)
            tags = {t.lower() for t in info["tags"]}
            if all(f.lower() in tags for f in wanted) and search in repo.repo_id.lower() \
                    and author in (None, repo.owner):
                out.append({k: info[k] for k in ("_id", "id", "private", "downloads", "likes", "tags", "cardData",
                                                 "lastModified", "createdAt", "library_name")})
        self._json(out[:limit])

    def paths_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        tree = repo.commits[self._commit_oid(repo, revision)]
        form = parse_qs(self._body().decode())
        out = []
        for path in form.get("paths", []):
            if path in tree:
                data = tree[path]
                entry: dict = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
                if is_lfs(path, len(data)):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                out.append(entry)
        self._json(out)

    def resolve(self, repo_id: str, revision: str, path: str) -> None:
        head = self.command == "HEAD"
        repo = self._repo(repo_id)
        oid = self._commit_oid(repo, revision)
        tree = repo.commits[oid]
        if path not in tree:
            raise _Refusal(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        data = tree[path]
        lfs = is_lfs(path, len(data))
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        if (repo_id, path) in self.hub.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        if head:
            return self._send(200, data, headers, body=False, content_type="application/octet-stream")
        repo.downloads += path == "rwkv-state.json"
        status, start = 200, 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m:
            start, status = int(m.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        key = (repo_id, path)
        if self.hub.cuts.get(key, 0) > 0:
            self.hub.cuts[key] -= 1
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._send(status, body, headers, content_type="application/octet-stream")


_REPO = r"(?P<repo_id>[\w.-]+/[\w.-]+)"
ROUTES = {
    "GET": [
        (r"/api/models", _Handler.list_models),
        (rf"/api/models/{_REPO}", _Handler.model_info),
        (rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.model_info),
        (rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
    ],
    "HEAD": [(rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve)],
    "POST": [
        (r"/api/repos/create", _Handler.create_repo),
        (r"/api/validate-yaml", _Handler.validate_yaml),
        (rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
        (rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
        (rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
        (rf"/api/models/{_REPO}/paths-info/(?P<revision>[^/]+)", _Handler.paths_info),
        (rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ],
    "PUT": [(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_upload)],
}


def copy_repo(hub: HubServer, source: str, target: str, changes: dict[str, bytes | None]) -> None:
    """A new repo `target` holding `source`'s files with `changes` applied (None removes a path): a damaged or
    hostile variant of a good repo, for the tests of what our readers make of it."""
    tree = {**hub.files(source), **changes}
    for path, data in tree.items():
        if data is not None:
            hub.add_file(target, path, data)
