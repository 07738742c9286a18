"""A tiny in-memory stand-in for the Hugging Face Hub HTTP API, for tests.

It speaks the subset of the Hub protocol that the real ``huggingface_hub`` client (and
``transformers`` on top of it) uses to create repos, upload files (regular git blobs and
classic Git LFS "basic" transfers), list and download them. Standard library only.

Usage::

    from hub_server import running_hub, run_client

    with running_hub() as endpoint:            # "http://127.0.0.1:PORT"
        run_client("from huggingface_hub import HfApi; ...", endpoint, hf_home=tmp_path)

The client must be configured *before* ``huggingface_hub`` is imported (it reads its
environment at import time), hence the subprocess helper ``run_client``; see ``hub_env`` for
the variables it sets. ``HF_HUB_DISABLE_XET=1`` is required: when ``hf_xet`` is installed
the client uploads through the Xet protocol unconditionally (no server negotiation), which
this server does not implement. Downloads never use Xet here because no ``X-Xet-*`` headers
are ever sent.

Like the real Hub, LFS content is served from a separate origin (a second port standing in
for the CDN / S3): ``/resolve/`` answers 302 for LFS files with ``X-Linked-Etag`` /
``X-Linked-Size`` and the client downloads from the ``Location`` without auth headers.

Any request the server has no route for gets a 404 and is printed to stderr as
``[test-hub] UNKNOWN ROUTE: ...`` and recorded in ``HubServer.unknown_routes``.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote

__all__ = ["HubServer", "running_hub", "hub_env", "run_client", "HubError"]

DEFAULT_USER = "user"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # files >= 10MB always go to LFS, as on the Hub
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Trimmed version of the .gitattributes the Hub puts in every new repo (initial commit).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack "
        "*.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors "
        "saved_model/**/* *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
    ).split()
)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """Raised by route handlers; becomes an error response with the Hub's X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(frozen=True)
class _File:
    size: int
    oid: str  # git blob id (of the content, or of the LFS pointer for LFS files)
    sha256: str | None = None  # set for LFS files; their content lives in HubState.blobs
    content: bytes | None = None  # set for regular files

    def lfs_info(self, sha_key: str = "oid") -> dict | None:
        if self.sha256 is None:
            return None
        return {sha_key: self.sha256, "size": self.size, "pointerSize": len(_lfs_pointer(self.sha256, self.size))}


@dataclass
class _Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _File]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # branch / refs/pr/N -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)
    num_prs: int = 0

    def resolve(self, revision: str) -> _Commit:
        revision = unquote(revision)
        sha = self.refs.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[sha]


class _Request:
    """What a route handler gets: parsed query, raw body, headers and the URLs to hand out."""

    def __init__(self, handler: BaseHTTPRequestHandler, query: dict, body: bytes, cdn_url: str):
        self.headers = handler.headers
        self.query = query
        self.body = body
        host, port = handler.server.server_address[:2]
        self.endpoint = f"http://{handler.headers.get('Host') or f'{host}:{port}'}"
        self.cdn_url = cdn_url

    def json(self):
        return json.loads(self.body or b"{}")

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in ("1", "true")


def _json(data, status: int = 200, headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode()


class HubState:
    """All repos, commits and LFS blobs, in memory. Route handlers are the methods below."""

    def __init__(self):
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 hex -> LFS content
        self._counter = itertools.count()

    # ----------------------------------------------------------------- helpers
    def repo(self, repo_type: str, repo_id: str) -> _Repo:
        try:
            return self.repos[(repo_type, repo_id)]
        except KeyError:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound") from None

    def _new_commit(self, repo: _Repo, parent: _Commit | None, title: str, message: str, files: dict) -> _Commit:
        seed = f"{repo.repo_id}|{parent and parent.sha}|{title}|{next(self._counter)}|{time.time_ns()}|"
        seed += "|".join(f"{p}:{f.oid}" for p, f in sorted(files.items()))
        commit = _Commit(hashlib.sha1(seed.encode()).hexdigest(), parent and parent.sha, title, message, _now(), files)
        repo.commits[commit.sha] = commit
        return commit

    def _lfs_patterns(self, commit: _Commit) -> list[str]:
        attrs = commit.files.get(".gitattributes")
        text = attrs.content.decode(errors="replace") if attrs and attrs.content is not None else ""
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line and line.strip()]

    @staticmethod
    def _is_lfs(path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
        if size >= LFS_SIZE_THRESHOLD or b"\0" in sample:  # big or binary => LFS (the Hub rejects binary blobs)
            return True
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(path if "/" in pat else name, pat) for pat in patterns)

    @staticmethod
    def _tree_entry(path: str, f: _File | None) -> dict:
        if f is None:  # folder
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}
        entry = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
        if f.sha256 is not None:
            entry["lfs"] = f.lfs_info()
        return entry

    @staticmethod
    def _folders(files: dict[str, _File]) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}

    # ------------------------------------------------------------------ repos
    def whoami(self, req):
        return _json({"type": "user", "name": DEFAULT_USER, "fullname": "Test User", "orgs": [],
                      "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def create_repo(self, req):
        payload = req.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
        url = f"{req.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return _json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = _Repo(repo_type, repo_id, private, _now())
            gitattributes = DEFAULT_GITATTRIBUTES.encode()
            files = {".gitattributes": _File(len(gitattributes), _git_blob_id(gitattributes), content=gitattributes)}
            repo.refs["main"] = self._new_commit(repo, None, "initial commit", "", files).sha
            self.repos[(repo_type, repo_id)] = repo
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self, req):
        payload = req.json()
        key = (payload.get("type") or "model", f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}")
        with self.lock:
            if self.repos.pop(key, None) is None:
                raise HubError(404, f"Repository not found: {key[1]}", "RepoNotFound")
        return _json({})

    def xet_token(self, req, type, repo, rest=None):
        message = ("test hub does not implement Xet storage: set HF_HUB_DISABLE_XET=1 in the client's environment "
                   "before huggingface_hub is imported (see hub_env)")
        print(f"[test-hub] XET REQUESTED: {message}", file=sys.stderr, flush=True)
        raise HubError(501, message)

    def validate_yaml(self, req):
        return _json({"errors": [], "warnings": []})

    def repo_info(self, req, type, repo, rev="main"):
        repo_type = REPO_TYPES[type]
        with self.lock:
            r = self.repo(repo_type, repo)
            commit = r.resolve(rev)
            siblings = [
                {"rfilename": p, "size": f.size, "blobId": f.oid, **({"lfs": f.lfs_info("sha256")} if f.sha256 else {})}
                for p, f in sorted(commit.files.items())
            ]
            used = sum(f.size for f in commit.files.values())
        info = {
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "author": repo.split("/")[0],
            "sha": commit.sha, "lastModified": commit.date, "createdAt": r.created_at, "private": r.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": used,
        }
        if repo_type == "model":
            info["modelId"] = repo
        return _json(info)

    def list_refs(self, req, type, repo):
        with self.lock:
            refs = dict(self.repo(REPO_TYPES[type], repo).refs)

        def ref(name, sha):
            full_ref = name if name.startswith("refs/") else f"refs/heads/{name}"
            return {"name": name, "ref": full_ref, "targetCommit": sha}

        return _json({
            "branches": [ref(n, s) for n, s in refs.items() if not n.startswith("refs/")],
            "converts": [], "tags": [],
            "pullRequests": [ref(n, s) for n, s in refs.items() if n.startswith("refs/pr/")],
        })

    def list_commits(self, req, type, repo, rev):
        with self.lock:
            r = self.repo(REPO_TYPES[type], repo)
            commit, history = r.resolve(rev), []
            while commit is not None:
                history.append({"id": commit.sha, "title": commit.title, "message": commit.message,
                                "date": commit.date, "authors": [{"user": DEFAULT_USER}]})
                commit = r.commits.get(commit.parent) if commit.parent else None
        return _json(history)

    def create_branch(self, req, type, repo, branch):
        branch = unquote(branch)
        start = req.json().get("startingPoint")
        with self.lock:
            r = self.repo(REPO_TYPES[type], repo)
            if branch in r.refs:
                return _json({"error": f"Reference already exists: {branch}"}, 409)
            r.refs[branch] = r.resolve(start or "main").sha
        return _json({})

    def delete_branch(self, req, type, repo, branch):
        with self.lock:
            r = self.repo(REPO_TYPES[type], repo)
            if r.refs.pop(unquote(branch), None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return _json({})

    # ----------------------------------------------------------------- listing
    def tree(self, req, type, repo, rev, path=None):
        path = unquote(path or "").strip("/")
        recursive = req.flag("recursive")
        with self.lock:
            r = self.repo(REPO_TYPES[type], repo)
            commit = r.resolve(rev)
            files = commit.files
            folders = self._folders(files)
            headers = {"X-Repo-Commit": commit.sha}
            if path and path not in folders:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
            prefix = f"{path}/" if path else ""
            entries = []
            for p in sorted(set(files) | folders):
                if not p.startswith(prefix) or (not recursive and "/" in p[len(prefix):]):
                    continue
                entries.append(self._tree_entry(p, files.get(p)))
        return _json(entries, headers=headers)

    def paths_info(self, req, type, repo, rev):
        if "json" in (req.headers.get("Content-Type") or ""):
            paths = req.json().get("paths", [])
        else:  # form-encoded, as sent by HfApi.get_paths_info: paths=a&paths=b&expand=false
            paths = parse_qs(req.body.decode()).get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        with self.lock:
            commit = self.repo(REPO_TYPES[type], repo).resolve(rev)
            folders = self._folders(commit.files)
            result = [
                self._tree_entry(p, commit.files.get(p))
                for p in (p.strip("/") for p in paths)
                if p in commit.files or p in folders
            ]
        return _json(result, headers={"X-Repo-Commit": commit.sha})

    # ------------------------------------------------------------------ upload
    def preupload(self, req, type, repo, rev):
        files = req.json().get("files", [])
        with self.lock:
            r = self.repo(REPO_TYPES[type], repo)
            commit = r.resolve(rev)
            patterns = self._lfs_patterns(commit)
            result = []
            for f in files:
                sample = base64.b64decode(f.get("sample", ""))
                lfs = self._is_lfs(f["path"], f["size"], sample, patterns)
                entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                existing = commit.files.get(f["path"])
                if existing is not None:  # lets the client skip unchanged files (sha256 for LFS, git oid otherwise)
                    entry["oid"] = existing.sha256 or existing.oid
                result.append(entry)
        return _json({"files": result, "commitOid": commit.sha})

    def lfs_batch(self, req, prefix, repo, op):
        repo_type = REPO_TYPES[prefix] if prefix else "model"
        payload = req.json()
        with self.lock:
            self.repo(repo_type, repo)
            if op == "verify":
                blob = self.blobs.get(payload["oid"])
                if blob is None or len(blob) != payload["size"]:
                    raise HubError(404, f"LFS object {payload['oid']} not found")
                return _json({"message": "ok"})
            if payload.get("operation") != "upload":
                raise HubError(400, "test hub: only the LFS 'upload' operation is implemented")
            objects = []
            for obj in payload["objects"]:
                out = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in self.blobs:  # already uploaded => no actions, the client skips it
                    verify = f"{req.endpoint}/{URL_PREFIX[repo_type]}{repo}.git/info/lfs/objects/verify"
                    out["actions"] = {
                        "upload": {"href": f"{req.cdn_url}/lfs-upload/{obj['oid']}?size={obj['size']}"},
                        "verify": {"href": verify},
                    }
                objects.append(out)
        body = json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode()
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, body

    def lfs_upload(self, req, oid):
        """The "S3" PUT target handed out by the batch endpoint (served on the CDN port)."""
        data = req.body
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"sha256 mismatch for uploaded LFS object {oid}")
        if "size" in req.query and int(req.query["size"][0]) != len(data):
            raise HubError(400, f"size mismatch for uploaded LFS object {oid}")
        with self.lock:
            self.blobs[oid] = data
        return 200, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, b""

    def commit(self, req, type, repo, rev):
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a 'header' line")
        header = lines[0]["value"]
        rev = unquote(rev)
        create_pr = req.flag("create_pr")
        with self.lock:
            r = self.repo(REPO_TYPES[type], repo)
            base = r.resolve(rev)
            if not create_pr and rev not in r.refs:
                raise HubError(400, f"Cannot commit to '{rev}': not a branch", "RevisionNotFound")
            if header.get("parentCommit") and not base.sha.startswith(header["parentCommit"]):
                raise HubError(412, f"A commit has happened since. Parent commit {header['parentCommit']} is not "
                                    f"the head of {rev} ({base.sha})")
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value.get("path", "").strip("/")
                if key == "file":
                    content = value["content"]
                    data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    files[path] = _File(len(data), _git_blob_id(data), content=data)
                elif key == "lfsFile":
                    blob = self.blobs.get(value["oid"])
                    if blob is None:
                        raise HubError(400, f"LFS object {value['oid']} for '{path}' was never uploaded")
                    files[path] = _File(len(blob), _git_blob_id(_lfs_pointer(value["oid"], len(blob))), value["oid"])
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"test hub: unsupported commit operation {key!r}")
            commit = self._new_commit(r, base, header.get("summary", ""), header.get("description", ""), files)
            pr_url = None
            if create_pr:
                r.num_prs += 1
                r.refs[f"refs/pr/{r.num_prs}"] = commit.sha
                pr_url = f"{req.endpoint}/{URL_PREFIX[r.repo_type]}{repo}/discussions/{r.num_prs}"
            else:
                r.refs[rev] = commit.sha
        url = f"{req.endpoint}/{URL_PREFIX[r.repo_type]}{repo}/commit/{commit.sha}"
        return _json({"success": True, "commitOid": commit.sha, "commitUrl": url, "hookOutput": "",
                      "pullRequestUrl": pr_url})

    # ---------------------------------------------------------------- download
    def resolve(self, req, prefix, repo, rev, path):
        repo_type = REPO_TYPES[prefix] if prefix else "model"
        path = unquote(path)
        with self.lock:
            commit = self.repo(repo_type, repo).resolve(rev)
            f = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        if f.sha256 is not None:  # LFS: redirect to the "CDN" origin, like the real Hub
            headers.update({
                "ETag": f'"{f.oid}"', "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                "Location": f"{req.cdn_url}/lfs-objects/{f.sha256}?filename={quote(path.rsplit('/', 1)[-1])}",
            })
            return 302, headers, b""
        headers.update({"ETag": f'"{f.oid}"', "Content-Type": "application/octet-stream"})
        return 200, headers, f.content

    def lfs_object(self, req, oid):
        with self.lock:
            data = self.blobs.get(oid)
        if data is None:
            raise HubError(404, f"LFS object {oid} not found")
        name = req.query.get("filename", [oid])[0]
        return 200, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                     "Content-Disposition": f'attachment; filename="{name}";'}, data


_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API = rf"/api/(?P<type>models|datasets|spaces)/{_REPO}"
_WEB = rf"/(?:(?P<prefix>datasets|spaces)/)?{_REPO}"
ROUTES = [  # (methods, raw path regex, HubState method name); first match wins
    ({"GET"}, r"/api/whoami-v2", "whoami"),
    ({"POST"}, r"/api/repos/create", "create_repo"),
    ({"DELETE"}, r"/api/repos/delete", "delete_repo"),
    ({"POST"}, r"/api/validate-yaml", "validate_yaml"),
    ({"GET"}, _API + r"/revision/(?P<rev>[^/]+)", "repo_info"),
    ({"GET"}, _API + r"/refs", "list_refs"),
    ({"GET"}, _API + r"/commits/(?P<rev>[^/]+)", "list_commits"),
    ({"POST"}, _API + r"/branch/(?P<branch>.+)", "create_branch"),
    ({"DELETE"}, _API + r"/branch/(?P<branch>.+)", "delete_branch"),
    ({"GET"}, _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ({"GET"}, _API + r"/xet-(?:read|write)-token(?:/(?P<rest>.*))?", "xet_token"),
    ({"POST"}, _API + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ({"POST"}, _API + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ({"POST"}, _API + r"/commit/(?P<rev>[^/]+)", "commit"),
    ({"POST"}, _WEB + r"\.git/info/lfs/objects/(?P<op>batch|verify)", "lfs_batch"),
    ({"GET", "HEAD"}, _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ({"PUT"}, r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ({"GET", "HEAD"}, r"/lfs-objects/(?P<oid>[0-9a-f]{64})", "lfs_object"),
    ({"GET"}, _API, "repo_info"),  # last: a 1-segment repo id would otherwise swallow e.g. "gpt2/refs"
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TestHub/1.0"
    server: _Server

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def log_message(self, format, *args):
        if self.server.owner.verbose:
            sys.stderr.write(f"[test-hub] {self.address_string()} {format % args}\n")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self, method: str) -> None:
        owner = self.server.owner
        raw_path, _, query = self.path.partition("?")
        body = self._read_body()
        req = _Request(self, parse_qs(query), body, owner.cdn_url)
        for methods, pattern, name in owner.routes:
            match = pattern.fullmatch(raw_path)
            if match and method in methods:
                try:
                    status, headers, payload = getattr(owner.state, name)(req, **match.groupdict())
                except HubError as e:
                    status, headers, payload = _json({"error": e.message}, e.status, e.headers)
                    if e.code:
                        headers["X-Error-Code"] = e.code
                    headers["X-Error-Message"] = e.message.encode("ascii", "replace").decode()
                except Exception as e:  # a bug in the test hub: make it loud
                    traceback.print_exc()
                    status, headers, payload = _json({"error": f"test hub crashed: {e!r}"}, 500)
                break
        else:
            msg = f"test hub: no route for {method} {self.path}"
            print(f"[test-hub] UNKNOWN ROUTE: {method} {self.path}", file=sys.stderr, flush=True)
            owner.unknown_routes.append(f"{method} {self.path}")
            status, headers, payload = _json({"error": msg}, 404)
        owner.requests.append((method, self.path, status))
        if status == 200 and method in ("GET", "HEAD") and "Range" in self.headers:
            status, headers, payload = _apply_range(self.headers["Range"], headers, payload)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)


def _apply_range(range_header: str, headers: dict, payload: bytes):
    """Minimal single-range support ("bytes=start-[end]"), used by the client to resume downloads."""
    try:
        start_s, end_s = range_header.strip().removeprefix("bytes=").split("-", 1)
        start = int(start_s)
        end = min(int(end_s), len(payload) - 1) if end_s else len(payload) - 1
    except ValueError:
        return 200, headers, payload
    if start >= len(payload):
        return 416, {**headers, "Content-Range": f"bytes */{len(payload)}"}, b""
    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(payload)}"}
    return 206, headers, payload[start : end + 1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: HubServer


class HubServer:
    """The test Hub: an API server plus a "CDN" server (second port) sharing one in-memory state.

    Use as a context manager (``with HubServer() as hub: hub.url``) or call start()/stop().
    Attributes: ``url`` (the HF_ENDPOINT), ``cdn_url``, ``state`` (HubState: repos, blobs),
    ``requests`` (list of (method, path, status)), ``unknown_routes`` (list of "METHOD path").
    """

    def __init__(self, host: str = "127.0.0.1", verbose: bool | None = None):
        self.host = host
        self.verbose = bool(os.environ.get("TEST_HUB_VERBOSE")) if verbose is None else verbose  # log every request
        self.state = HubState()
        self.routes = [(methods, re.compile(p), name) for methods, p, name in ROUTES]
        self.requests: list[tuple[str, str, int]] = []
        self.unknown_routes: list[str] = []
        self._servers: list[_Server] = []
        self.url = self.cdn_url = ""

    def start(self) -> HubServer:
        for _ in range(2):  # [0] = API, [1] = CDN (a different origin => the client drops auth, as with the real CDN)
            server = _Server((self.host, 0), _Handler)
            server.owner = self
            threading.Thread(target=server.serve_forever, args=(0.05,), name="test-hub", daemon=True).start()
            self._servers.append(server)
        self.url, self.cdn_url = (f"http://{self.host}:{s.server_address[1]}" for s in self._servers)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def running_hub(verbose: bool | None = None):
    """Start a test Hub on a free port in background threads; yield its endpoint URL; stop it on exit."""
    with HubServer(verbose=verbose) as hub:
        yield hub.url


def hub_env(endpoint: str, hf_home: str | os.PathLike, token: str | None = "test", base: dict | None = None) -> dict:
    """Environment for a client process talking to the test Hub (must be set before huggingface_hub is imported)."""
    env = dict(os.environ if base is None else base)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH",
                "HF_HUB_ENABLE_HF_TRANSFER", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        env.pop(key, None)
    env.update({
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),  # private cache + token dir: nothing shared with the user's real cache
        "HF_HUB_DISABLE_XET": "1",  # required: with hf_xet installed, uploads would otherwise use Xet
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    if token is not None:
        env["HF_TOKEN"] = token
    else:
        env.pop("HF_TOKEN", None)
    return env


# Prepended to scripts run by run_client: any connection to a host other than localhost fails loudly.
NETWORK_GUARD = '''
import socket as _socket
_real_getaddrinfo = _socket.getaddrinfo
def _local_only_getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else str(host)
    if name not in ("127.0.0.1", "localhost", "::1", "None"):
        raise OSError(f"test hub network guard: connection to {name!r} blocked")
    return _real_getaddrinfo(host, *args, **kwargs)
_socket.getaddrinfo = _local_only_getaddrinfo
'''


def run_client(
    script: str,
    endpoint: str,
    hf_home: str | os.PathLike,
    *,
    env: dict | None = None,
    timeout: float = 120,
    cwd: str | os.PathLike | None = None,
    network_guard: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``script`` (dedented) with ``sys.executable`` in the ``hub_env`` environment plus ``env``.

    Raises AssertionError carrying the script's stdout/stderr if it exits non-zero; returns the CompletedProcess.
    """
    code = (NETWORK_GUARD if network_guard else "") + textwrap.dedent(script)
    full_env = hub_env(endpoint, hf_home)
    for key, value in (env or {}).items():  # a None value removes the variable
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = str(value)
    proc = subprocess.run([sys.executable, "-c", code], env=full_env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"client script failed (rc={proc.returncode})\n--- stdout ---\n{proc.stdout}"
                             f"\n--- stderr ---\n{proc.stderr}")
    return proc


if __name__ == "__main__":  # manual use: python tests/hub_server.py  -> prints the endpoint, serves until Ctrl-C
    with HubServer(verbose=True) as _hub:
        print(f"HF_ENDPOINT={_hub.url}  (CDN {_hub.cdn_url}); remember HF_HUB_DISABLE_XET=1", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
