"""A small Hugging Face Hub on 127.0.0.1 that speaks the endpoints huggingface_hub's push path uses.

Enough of the Hub for `HfApi.create_repo`, `create_branch`, `upload_folder` (both its single-commit path
with LFS, used without hf_xet, and its pipelined path with regular files, used with hf_xet) and
`create_pull_request`, with every request recorded (method, path, query, all headers, body) as the
tests' evidence. It keeps repositories in memory: branches and PR refs map file paths to content and oid.

Upload modes: files whose name ends with one of `lfs_suffixes` are LFS (as the Hub's default
.gitattributes makes *.safetensors); the others are regular git blobs sent inside the commit. With
`lfs_suffixes=()` nothing needs LFS or Xet storage, so a client with hf_xet installed uploads over plain
HTTP too. `fail(...)` makes chosen requests answer with an error status, as the Hub does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


@dataclass
class Recorded:
    method: str
    path: str  # as sent, still percent-encoded
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Fault:
    method: str
    pattern: str  # a regex searched in the request path
    status: int
    message: str
    headers: dict[str, str]
    times: int | None  # None: every time


@dataclass
class Repo:
    private: bool
    refs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)  # every commit: ref, message, files
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    prs: int = 0


def git_blob_oid(content: bytes) -> str:
    """The git object id of a regular file, which the Hub returns as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """`with FakeHub(token) as hub:` serves on hub.url until the block ends."""

    def __init__(self, token: str, lfs_suffixes: tuple[str, ...] = (".safetensors",)):
        self.token = token
        self.lfs_suffixes = lfs_suffixes
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # LFS storage by sha256
        self.requests: list[Recorded] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fail(self, method: str, pattern: str, status: int, message: str = "refused", times: int | None = None,
             headers: dict[str, str] | None = None) -> None:
        """Answer requests of `method` whose path matches `pattern` with `status` (JSON {"error": message})."""
        self.faults.append(Fault(method, pattern, status, message, headers or {}, times))

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> None:
        """A repository that exists before the test (someone's earlier model)."""
        repo = self.repos[repo_id] = Repo(private)
        for path, content in (files or {}).items():
            repo.refs["main"][path] = {"content": content, "oid": git_blob_oid(content), "lfs": False}

    def seen(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    # ------------------------------------------------------------ endpoints

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            self.requests.append(Recorded(method, path, query, headers, body))
            for fault in self.faults:
                if fault.method == method and re.search(fault.pattern, path) and fault.times != 0:
                    if fault.times is not None:
                        fault.times -= 1
                    return _json(fault.status, {"error": fault.message},
                                 {"X-Error-Message": fault.message, **fault.headers})
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts[:1] == ["lfs-upload"] and method == "PUT":  # a presigned storage URL: no Authorization
            return self._lfs_put(parts[1], body)
        if headers.get("authorization") != f"Bearer {self.token}":
            return _json(401, {"error": "Invalid credentials in Authorization header"},
                         {"X-Error-Message": "Invalid credentials in Authorization header"})
        with self.lock:
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create(json.loads(body))
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body)["content"])
            if path.endswith(".git/info/lfs/objects/batch"):
                return self._lfs_batch(parts[0] + "/" + parts[1].removesuffix(".git"), json.loads(body))
            if parts[:2] == ["api", "models"] and len(parts) >= 5:
                repo_id, verb, rest = f"{parts[2]}/{parts[3]}", parts[4], parts[5:]
                if repo_id not in self.repos:
                    return _json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                repo = self.repos[repo_id]
                if method == "POST" and verb == "preupload":
                    return self._preupload(repo, rest[0], json.loads(body))
                if method == "POST" and verb == "commit":
                    return self._commit(repo_id, repo, rest[0], body, "create_pr" in query)
                if method == "POST" and verb == "branch":
                    return self._branch(repo, rest[0])
                if method == "GET" and verb == "revision":
                    return self._info(repo_id, repo, rest[0])
                if method == "POST" and verb == "discussions":
                    return _json(200, {"num": self._open_pr(repo)})
                if method == "GET" and verb == "discussions":
                    return self._discussion(repo_id, int(rest[0]))
        return _json(404, {"error": f"fake hub: no endpoint {method} {path}"})

    def _create(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return _json(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return _json(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, content: str) -> tuple[int, dict[str, str], bytes]:
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            yaml.safe_load(match.group(1) if match else "")
        except yaml.YAMLError as e:
            return _json(400, {"errors": [{"message": str(e)}]})
        return _json(200, {"errors": [], "warnings": []})

    def _ref(self, repo: Repo, revision: str) -> dict[str, dict[str, Any]] | None:
        return repo.refs.get(revision)

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        ref = self._ref(repo, revision)
        if ref is None:
            return _json(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(self.lfs_suffixes) else "regular",
                  "shouldIgnore": False, "oid": (ref.get(f["path"]) or {}).get("oid")} for f in payload["files"]]
        return _json(200, {"files": files})

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:  # already stored objects get no actions: the client skips them
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}", "header": {}}}
            objects.append(entry)
        return _json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if hashlib.sha256(body).hexdigest() != oid:
            return _json(400, {"error": "content does not match its oid"})
        with self.lock:
            self.lfs[oid] = body
        return 200, {}, b""

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes,
                create_pr: bool) -> tuple[int, dict[str, str], bytes]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        pr_num = None
        if create_pr:
            pr_num = self._open_pr(repo)
            revision = f"refs/pr/{pr_num}"
        ref = self._ref(repo, revision)
        if ref is None:
            return _json(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        changed = {}
        for item in lines:
            v = item["value"]
            if item["key"] == "file":
                content = base64.b64decode(v["content"])
                changed[v["path"]] = {"content": content, "oid": git_blob_oid(content), "lfs": False}
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.lfs:
                    return _json(422, {"error": f"LFS object {v['oid']} was never uploaded"})
                changed[v["path"]] = {"content": self.lfs[v["oid"]], "oid": v["oid"], "lfs": True}
        ref.update(changed)
        oid = hashlib.sha1(json.dumps([repo_id, revision, len(repo.commits), sorted(changed)]).encode()).hexdigest()
        repo.heads[revision] = oid
        repo.commits.append({"ref": revision, "summary": header["summary"], "files": sorted(changed), "oid": oid})
        return _json(200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                           "pullRequestUrl": f"{self.url}/{repo_id}/discussions/{pr_num}" if pr_num else None})

    def _branch(self, repo: Repo, branch: str) -> tuple[int, dict[str, str], bytes]:
        if branch in repo.refs:
            return _json(409, {"error": "Reference already exists"})
        repo.refs[branch] = dict(repo.refs["main"])
        repo.heads[branch] = repo.heads["main"]
        return _json(200, {})

    def _open_pr(self, repo: Repo) -> int:
        repo.prs += 1
        repo.refs[f"refs/pr/{repo.prs}"] = dict(repo.refs["main"])
        repo.heads[f"refs/pr/{repo.prs}"] = repo.heads["main"]
        return repo.prs

    def _info(self, repo_id: str, repo: Repo, revision: str) -> tuple[int, dict[str, str], bytes]:
        if revision not in repo.refs:
            return _json(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
        return _json(200, {"id": repo_id, "sha": repo.heads[revision], "private": repo.private,
                           "siblings": [{"rfilename": f} for f in sorted(repo.refs[revision])]})

    def _discussion(self, repo_id: str, num: int) -> tuple[int, dict[str, str], bytes]:
        return _json(200, {"title": "pr", "num": num, "author": {"name": "me"}, "createdAt": "2026-01-01T00:00:00Z",
                           "status": "draft", "repo": {"name": repo_id, "type": "model"}, "isPullRequest": True,
                           "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": []})


def _json(status: int, data: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            url = urlsplit(self.path)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, payload = hub.handle(self.command, url.path, parse_qs(url.query), headers, self._body())
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args: Any) -> None:  # the recorded requests are the log
            pass

    return Handler
