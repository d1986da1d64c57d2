"""A token service for distribution's bearer auth, run inside the test process.

It signs RS256 JWTs with a throwaway key whose self-signed certificate the registry trusts
(`rootcertbundle`); the token header carries the certificate (`x5c`), which distribution verifies
against that bundle. Signing uses the `openssl` CLI, so no Python crypto package is needed.

Expiry for tests: distribution accepts a token until `exp + 60 s` (its clock-skew leeway), so a
token with `registry_lifetime=3` is issued with `exp = now + 3 - 60`: the registry refuses it
after ~3 s while the client, told `expires_in`, may still think it valid -> a 401 mid-sequence.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from harness.procs import run

LEEWAY = 60  # distribution/registry/auth/token/token.go: Leeway = 60 * time.Second


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class IssuedToken:
    user: str | None
    scopes: tuple[str, ...]
    token: str


@dataclass
class TokenIssuer:
    base: Path
    service: str = "lazysnap-test-registry"
    issuer: str = "lazysnap-test-issuer"
    users: dict[str, str] | None = None  # None: anonymous may get tokens
    expires_in: int = 300  # what the answer tells the client
    registry_lifetime: float = 300.0  # how long the registry will accept the token
    # OAuth2 refresh tokens (docker's identity tokens) it accepts, and the user each stands for
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    issued: list[IssuedToken] = field(default_factory=list)
    refused: int = 0
    # Repositories anyone may pull but nobody may push to (a namespace the user cannot write).
    read_only: set[str] = field(default_factory=set)
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def key_path(self) -> Path:
        return self.base / "issuer-key.pem"

    @property
    def cert_path(self) -> Path:
        return self.base / "issuer-cert.pem"

    @property
    def realm(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def start(self) -> TokenIssuer:
        self.base.mkdir(parents=True, exist_ok=True)
        run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-sha256",
                "-keyout",
                str(self.key_path),
                "-out",
                str(self.cert_path),
                "-days",
                "2",
                "-subj",
                "/CN=lazysnap-test-token-issuer",
            ],
            "token issuer key",
        )
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert_path), "-outform", "DER"],
            capture_output=True,
            check=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer._answer(self)

            def do_POST(self) -> None:
                issuer._answer_oauth(self)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _user(self, handler: BaseHTTPRequestHandler) -> tuple[bool, str | None]:
        header = handler.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return self.users is None, None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        ok = self.users is not None and self.users.get(user) == password
        return ok, user

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        ok, user = self._user(handler)
        if not ok:
            self.refused += 1
            handler.send_response(401)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            handler.wfile.write(b'{"details":"bad credentials"}')
            return
        scopes = tuple(query.get("scope", []))
        token = self.sign(user or "", scopes, query.get("service", [self.service])[0])
        self.issued.append(IssuedToken(user, scopes, token))
        body = json.dumps({"token": token, "expires_in": self.expires_in}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _answer_oauth(self, handler: BaseHTTPRequestHandler) -> None:
        """The token spec's OAuth2 POST: grant_type password (containerd's first try with a
        user and password) or refresh_token (an identity token)."""
        length = int(handler.headers.get("Content-Length") or 0)
        form = parse_qs(handler.rfile.read(length).decode())

        def one(name: str) -> str:
            return form.get(name, [""])[0]

        user: str | None = None
        if one("grant_type") == "password":
            if self.users is not None and self.users.get(one("username")) == one("password"):
                user = one("username")
        elif one("grant_type") == "refresh_token":
            user = self.refresh_tokens.get(one("refresh_token"))
        if user is None:
            self.refused += 1
            handler.send_response(401)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            handler.wfile.write(b'{"details":"bad credentials"}')
            return
        scopes = tuple(one("scope").split())
        token = self.sign(user, scopes, one("service") or self.service)
        self.issued.append(IssuedToken(user, scopes, token))
        body = json.dumps({"access_token": token, "expires_in": self.expires_in}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def sign(self, subject: str, scopes: tuple[str, ...], audience: str) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a]
            if kind == "repository" and name in self.read_only:
                granted = [a for a in granted if a == "pull"]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + int(self.registry_lifetime) - LEEWAY,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"
