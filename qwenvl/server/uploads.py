"""Local files uploaded the way the official dashscope SDK uploads them, kept on this server's disk.

The SDK never sends a local path. For a `file://` URL (or a bare path) in an image, video or audio part it
1. GETs `{base}/uploads?action=getPolicy&model=M` with its Bearer key and reads, from the answer's `data`:
   upload_host, upload_dir, policy, signature, oss_access_key_id, x_oss_object_acl, x_oss_forbid_overwrite;
2. POSTs a multipart form to `upload_host`: those fields, `key` = upload_dir + "/" + the file's base name,
   and the file; without an Authorization header (on Alibaba Cloud's OSS the signed policy is the
   credential);
3. sends `oss://{key}` in the message, with the header `X-DashScope-OssResourceResolve: enable`.

This server plays both DashScope and OSS. Its policy is base64 JSON naming the upload folder, who asked for it
(a fingerprint of the Bearer token, never the token), the byte cap and the expiry, signed with HMAC-SHA256
under a secret made at start-up: the form upload is authenticated by the policy, as on OSS, and only a
caller that passed the API key check gets one. The folder holds 128 random bits; each file is stored under a
random name of its own (the client's name lives only in the index), so no key can name a path outside the
store. A key resolves only for a request that carries the header and the same Bearer token that asked for the
policy, until it expires; anything else is "not found", never another caller's file. The store is bounded in
bytes and in files: expired files go first, then the oldest; at most `concurrent` uploads arrive at once, so
the disk they take while arriving is bounded too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .errors import APIError, bad_request

RESOLVE_HEADER = "x-dashscope-ossresourceresolve"        # lower-cased, as the gate's header dict holds it
DIR_PREFIX = "qwenvl-uploads/"
ACCESS_KEY_ID = "qwenvl-local"                           # what the SDK echoes as OSSAccessKeyId
_KEY = re.compile(r"qwenvl-uploads/([0-9a-f]{32})/(.+)", re.DOTALL)
_STORED = re.compile(r"[0-9a-f]{32}\.upload")             # the names this store gives files on disk
NAME_MAX = 255


@dataclass(frozen=True)
class UploadLimits:
    ttl_s: float = 3600.0                 # how long a policy and an uploaded file stay valid
    store_bytes: int = 1 << 30            # all files together; the oldest are evicted past it
    max_files: int = 4096
    file_bytes: int = 64 << 20            # one upload (the admission policy's largest media cap)
    concurrent: int = 8                   # uploads arriving at once (each spools up to file_bytes); 429 past it


@dataclass(frozen=True)
class Grant:
    """What a verified policy allows: files under `upload_dir`, for `owner`, each up to `max_bytes`."""
    upload_dir: str
    owner: str
    max_bytes: int


@dataclass
class _Entry:
    path: Path
    owner: str
    expires: float
    size: int
    kind: str                             # "image" | "video" | "pdf", sniffed when it was uploaded


class UploadStore:
    """One per app. Files on disk under `root`: a private temporary folder by default, made at the first upload
    and removed at close; a given folder is kept, the files this store wrote in it are not."""

    def __init__(self, root: str | None = None, limits: UploadLimits = UploadLimits(), clock=time.time):
        self._given_root = None if root is None else Path(root)
        self._root: Path | None = None           # made at the first upload: most servers never see one
        self._cleanup = None
        self.limits = limits
        self._clock = clock
        self._secret = secrets.token_bytes(32)
        self._files: OrderedDict[str, _Entry] = OrderedDict()      # key -> file, oldest first
        self._bytes = 0
        self.arriving = 0                         # uploads being received now (the route counts them)

    # ------------------------------------------------------------------ the policy
    def owner_of(self, authorization: str | None) -> str:
        """Who is asking: a keyed hash of the Bearer token (an empty one for no header)."""
        token = (authorization or "").partition(" ")[2].strip()
        return hmac.new(self._secret, b"owner\0" + token.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]

    def issue(self, owner: str, upload_host: str) -> dict:
        """The `data` of a getPolicy answer: every field the SDK reads, and DashScope's informative ones."""
        ttl = self.limits.ttl_s
        upload_dir = DIR_PREFIX + secrets.token_hex(16)
        policy = base64.b64encode(json.dumps({
            "dir": upload_dir, "owner": owner, "max_bytes": self.limits.file_bytes,
            "expires": self._clock() + ttl}).encode()).decode()
        return {"policy": policy, "signature": self._sign(policy), "upload_dir": upload_dir,
                "upload_host": upload_host, "expire_in_seconds": int(ttl),
                "max_file_size_mb": self.limits.file_bytes // 2 ** 20,
                "capacity_limit_mb": self.limits.store_bytes // 2 ** 20,
                "oss_access_key_id": ACCESS_KEY_ID, "x_oss_object_acl": "private", "x_oss_forbid_overwrite": "false"}

    def check_form(self, policy: str, signature: str, key: str) -> tuple[Grant, str]:
        """(what the policy allows, the file name) for an upload form; 403 for a policy this server did not
        sign or that expired, 400 for a key outside the policy's folder or a name that is not a plain name."""
        if not hmac.compare_digest(self._sign(policy).encode(), signature.encode("utf-8", "replace")):
            raise APIError(403, "the upload's policy and signature were not issued by this server; ask "
                           "GET /api/v1/uploads?action=getPolicy for a new policy")
        try:
            fields = json.loads(base64.b64decode(policy, validate=True))
        except (binascii.Error, ValueError):          # cannot happen for a policy this server signed
            raise APIError(403, "the upload policy does not decode") from None
        if fields["expires"] < self._clock():
            raise APIError(403, f"the upload policy expired (policies are valid {self.limits.ttl_s:.0f} s); ask "
                           "GET /api/v1/uploads?action=getPolicy for a new one")
        prefix = fields["dir"] + "/"
        if not key.startswith(prefix):
            raise bad_request(f"key: {key[:120]!r} is outside the policy's upload_dir {fields['dir']!r}", "key")
        return Grant(fields["dir"], fields["owner"], int(fields["max_bytes"])), _checked_name(key[len(prefix):])

    def _sign(self, policy: str) -> str:
        return base64.b64encode(hmac.new(self._secret, policy.encode(), hashlib.sha256).digest()).decode()

    # ------------------------------------------------------------------ the files
    @property
    def root(self) -> Path:
        if self._root is None:
            if self._given_root is None:
                self._root = Path(tempfile.mkdtemp(prefix="qwenvl-uploads-"))
                # removed at close(), or when the store is collected or the interpreter exits without it
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._root, True)
            else:
                self._root = self._given_root
                self._root.mkdir(parents=True, exist_ok=True)
                for stale in self._root.iterdir():     # an earlier run's files: their index went with it
                    if _STORED.fullmatch(stale.name) or stale.name.startswith(".partial-"):
                        stale.unlink(missing_ok=True)
        return self._root

    def partial_path(self) -> Path:
        """Where an upload is written while it arrives (moved in by `put`, or removed by the caller)."""
        return self.root / f".partial-{secrets.token_hex(16)}"

    def put(self, grant: Grant, name: str, partial: Path, kind: str) -> str:
        """Keep the file written at `partial` as `{upload_dir}/{name}`; returns that key. A key uploaded again
        (the same file twice in one message) is replaced: only the policy's holder can write in its folder."""
        key = f"{grant.upload_dir}/{name}"
        size = partial.stat().st_size
        if key in self._files:
            self._drop(key)
        self._make_room(size)
        path = self.root / f"{secrets.token_hex(16)}.upload"
        partial.replace(path)
        self._files[key] = _Entry(path, grant.owner, self._clock() + self.limits.ttl_s, size, kind)
        self._bytes += size
        return key

    def find(self, url: str, owner: str, where: str) -> _Entry:
        """The file an `oss://` URL names, for this owner; 400 for a URL this server never makes, 404 for one
        it does not hold for this owner (unknown, expired, evicted or another caller's: the same answer)."""
        key = url.strip()[len("oss://"):]
        match = _KEY.fullmatch(key)
        if match is None or _name_problem(match.group(2)) is not None:
            raise bad_request(f"{where}: {url[:120]!r} is not a file uploaded to this server (its oss:// URLs "
                              f"look like oss://{DIR_PREFIX}<32 hex digits>/<file name>)", where)
        self._expire()
        entry = self._files.get(key)
        if entry is None or not hmac.compare_digest(entry.owner, owner):
            raise APIError(404, f"{where}: {url[:120]!r} was not found: it expired (uploads are kept "
                           f"{self.limits.ttl_s:.0f} s), or it was uploaded with another API key, or never; "
                           "upload the file again", param=where)
        return entry

    async def read(self, url: str, owner: str, where: str, want: str, cap: int) -> bytes:
        """The bytes of the file `url` names, read as `want` ("image", "video" or "pdf") under `cap` bytes."""
        entry = self.find(url, owner, where)
        if entry.kind != want:
            hint = {"pdf": "; a PDF is read as a document when its name ends in .pdf",
                    "video": "; send it as a 'video' part"}.get(entry.kind, "")
            raise bad_request(f"{where}: the uploaded file {url[:120]!r} is a {entry.kind}, not {_an(want)}{hint}",
                              where)
        if entry.size > cap:
            raise bad_request(f"{where}: the uploaded file is {entry.size} bytes, over the {cap}-byte limit for "
                              f"{_an(want)}", where)
        try:
            return await asyncio.to_thread(entry.path.read_bytes)
        except FileNotFoundError:                  # evicted while this request was reading it
            raise APIError(404, f"{where}: {url[:120]!r} was evicted from the upload store; upload it again",
                           param=where) from None

    def close(self) -> None:
        for key in list(self._files):
            self._drop(key)
        if self._cleanup is not None:
            self._cleanup()

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._files.items() if e.expires < now]:
            self._drop(key)

    def _make_room(self, size: int) -> None:
        self._expire()
        while self._files and (self._bytes + size > self.limits.store_bytes
                               or len(self._files) + 1 > self.limits.max_files):
            self._drop(next(iter(self._files)))        # the oldest

    def _drop(self, key: str) -> None:
        entry = self._files.pop(key)
        self._bytes -= entry.size
        entry.path.unlink(missing_ok=True)


def _an(kind: str) -> str:
    return {"image": "an image", "video": "a video", "pdf": "a PDF"}[kind]


def _name_problem(name: str) -> str | None:
    if not name or len(name) > NAME_MAX:
        return f"must be 1 to {NAME_MAX} characters"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "must be a plain file name (no '/', '\\', '.' or '..')"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not hold control characters"
    return None


def _checked_name(name: str) -> str:
    if (problem := _name_problem(name)) is not None:
        raise bad_request(f"key: the file name {name[:120]!r} {problem}", "key")
    return name


@dataclass(frozen=True)
class UploadReader:
    """One request's view of the store: the files its Bearer token uploaded."""
    store: UploadStore
    owner: str

    async def read(self, url: str, where: str, want: str, cap: int) -> bytes:
        return await self.store.read(url, self.owner, where, want, cap)


def reader_for(store: UploadStore | None, headers) -> UploadReader | None:
    """The request's reader when it opts in to oss:// resolution (the header the SDK sends), else None."""
    if store is None or headers.get(RESOLVE_HEADER, "").strip().lower() != "enable":
        return None
    return UploadReader(store, store.owner_of(headers.get("authorization")))
