"""Bearer-token auth for every route of the job API.

The token comes from FORGE_API_TOKEN. Without one the server refuses to start unless it is
bound to 127.0.0.1 and the operator said --insecure-local: a job API can run code-heavy
training on the machine, so it is never open by accident. Tokens are compared with
`hmac.compare_digest` (constant time) and never logged.
"""

from __future__ import annotations

import hmac
import os

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

TOKEN_ENV = "FORGE_API_TOKEN"
LOOPBACK = "127.0.0.1"


class AuthConfigError(RuntimeError):
    """The server may not start with this combination of host and token."""


def resolve_token(host: str, insecure_local: bool, environ=None) -> str | None:
    """The token to require, or None for an open loopback server; raises AuthConfigError."""
    token = (environ if environ is not None else os.environ).get(TOKEN_ENV, "").strip()
    if token:
        return token
    if insecure_local and host == LOOPBACK:
        return None
    if insecure_local:
        raise AuthConfigError(f"--insecure-local is only allowed with --host {LOOPBACK}, not {host!r}")
    raise AuthConfigError(f"set {TOKEN_ENV} to a secret token (or, on {LOOPBACK} only, pass --insecure-local)")


def bearer_dependency(expected: str | None):
    """A FastAPI dependency: 401 without a bearer token, 403 with a wrong one."""
    scheme = HTTPBearer(auto_error=False, description=f"the value of {TOKEN_ENV} on the server")
    wanted = expected.encode() if expected is not None else None

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        if wanted is None:
            return
        if credentials is None or not credentials.credentials:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), wanted):
            raise HTTPException(403, "invalid token")

    return check
