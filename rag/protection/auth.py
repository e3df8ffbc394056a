"""Who is asking: bearer JWTs, and the short-lived tokens that open one job's stream.

Verification is PyJWT's, with the algorithm pinned by the settings (HS256 with
a shared secret, or RS256 with a public key), and ``exp``, ``nbf``, ``iss``,
``aud`` and ``sub`` required. ``sub`` is the user id; a role claim naming the
admin role marks an administrator. Every failure is :class:`Unauthorized` with
a message that says what was wrong and never echoes the token.

Stream tokens exist because a browser's ``EventSource`` cannot send an
``Authorization`` header: ``events_url`` carries a token signed with the
server's own secret (HS256, audience :data:`STREAM_AUDIENCE`), naming the user
and the one job it opens, valid for ``STREAM_TOKEN_TTL`` seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from rag.platform.errors import AssistantError, ConfigError
from rag.platform.settings import Settings

#: What a user id may look like, from a token or the development header.
USER_ID = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")
STREAM_AUDIENCE = "course-assistant:job-events"
#: Only used when neither STREAM_TOKEN_SECRET nor an HS256 secret is set, which
#: the settings allow only with the development identity header on.
_DEV_STREAM_SECRET = "development-only-stream-token-secret-not-for-production"
_REQUIRED = ["exp", "sub"]


class Unauthorized(AssistantError):
    code = "unauthorized"
    status = 401


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    admin: bool = False
    #: A course platform's service credential (``AUTH_PLATFORM_ROLE``): may report
    #: learners' progress, and nothing more.
    platform: bool = False


class Authenticator:
    """Verifies bearer tokens and signs/verifies stream tokens for one set of settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.algorithm = settings.auth_jwt_algorithm
        self._key = _verification_key(settings)
        secret = settings.stream_token_secret or (
            # Derived, not shared: a stream token must never verify as a bearer token.
            _derive(settings.auth_jwt_secret, "stream-tokens")
            if self.algorithm == "HS256" and settings.auth_jwt_secret
            else None
        )
        if secret is None and self._key is not None:
            raise ConfigError(
                "STREAM_TOKEN_SECRET is required when AUTH_JWT_ALGORITHM is RS256 "
                "(it signs the tokens in events_url)"
            )
        if secret is None:
            # No bearer tokens: only the development header can identify anyone,
            # and then every API process must sign stream tokens alike.
            secret = _DEV_STREAM_SECRET if settings.dev_identity_header else secrets.token_hex(32)
        self._stream_secret = secret

    @property
    def enabled(self) -> bool:
        """Whether bearer tokens can be verified at all (a key is configured)."""
        return self._key is not None

    def verify(self, token: str) -> Identity:
        """The identity in a bearer token, or :class:`Unauthorized` saying why not."""
        if self._key is None:
            raise Unauthorized("bearer tokens are not accepted: no AUTH_JWT_* key is configured")
        s = self.settings
        required = list(_REQUIRED)
        if s.auth_jwt_issuer:
            required.append("iss")
        if s.auth_jwt_audience:
            required.append("aud")
        claims = _decode(
            token,
            self._key,
            self.algorithm,
            audience=s.auth_jwt_audience,
            issuer=s.auth_jwt_issuer,
            required=required,
            leeway=s.auth_jwt_leeway,
        )
        if claims.get("aud") == STREAM_AUDIENCE or "job" in claims:
            # Belt and braces beside the separate key: stream tokens end up in
            # access logs and must not open anything but their one stream.
            raise Unauthorized("a stream token is not a bearer token")
        user = _user(claims)
        roles = claims.get(s.auth_role_claim)
        if isinstance(roles, str):
            roles = [roles]
        roles = roles if isinstance(roles, list) else []
        return Identity(user, s.auth_admin_role in roles, s.auth_platform_role in roles)

    # -- stream tokens

    def stream_token(self, user_id: str, job_id: uuid.UUID, *, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims = {
            "sub": user_id,
            "job": str(job_id),
            "aud": STREAM_AUDIENCE,
            "iat": issued,
            "exp": issued + self.settings.stream_token_ttl,
        }
        return jwt.encode(claims, self._stream_secret, algorithm="HS256")

    def verify_stream_token(self, token: str, job_id: uuid.UUID) -> str:
        """The user a stream token was issued to, if it is valid for ``job_id``."""
        claims = _decode(
            token,
            self._stream_secret,
            "HS256",
            audience=STREAM_AUDIENCE,
            issuer=None,
            required=["exp", "sub", "job", "aud"],
            leeway=0,
            what="stream token",
        )
        if claims.get("job") != str(job_id):
            raise Unauthorized("the stream token was issued for another job")
        return _user(claims)


def _decode(
    token: str,
    key: Any,
    algorithm: str,
    *,
    audience: str | None,
    issuer: str | None,
    required: list[str],
    leeway: int,
    what: str = "bearer token",
) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Unauthorized(f"the {what} is not a well-formed JWT") from None
    if header.get("alg") != algorithm:
        # Pinned: "none", or HS256 signed with a public key, never gets this far.
        raise Unauthorized(f"the {what} must be signed with {algorithm}")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": required, "verify_aud": audience is not None},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized(f"the {what} has expired") from None
    except jwt.ImmatureSignatureError:
        raise Unauthorized(f"the {what} is not valid yet (nbf)") from None
    except jwt.InvalidAudienceError:
        raise Unauthorized(f"the {what} is for another audience") from None
    except jwt.InvalidIssuerError:
        raise Unauthorized(f"the {what} comes from an unexpected issuer") from None
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthorized(f"the {what} lacks the {exc.claim!r} claim") from None
    except jwt.InvalidSignatureError:
        raise Unauthorized(f"the {what}'s signature does not verify") from None
    except jwt.PyJWTError:
        raise Unauthorized(f"the {what} is invalid") from None
    return claims


def _derive(secret: str, purpose: str) -> str:
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def _user(claims: dict[str, Any]) -> str:
    user = claims.get("sub")
    if not isinstance(user, str) or not USER_ID.match(user):
        raise Unauthorized("the token's subject must be 1 to 128 letters, digits or _.@:-")
    return user


def _verification_key(settings: Settings) -> Any:
    if settings.auth_jwt_algorithm == "HS256":
        return settings.auth_jwt_secret
    pem = settings.auth_jwt_public_key
    if pem is None:
        return None
    text = pem if pem.lstrip().startswith("-----BEGIN") else Path(pem).read_text()
    try:
        key = serialization.load_pem_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"AUTH_JWT_PUBLIC_KEY is not a PEM public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError("AUTH_JWT_PUBLIC_KEY must be an RSA public key for RS256")
    return key


def issue_token(
    settings: Settings,
    user_id: str,
    *,
    admin: bool = False,
    platform: bool = False,
    ttl: int = 3600,
    private_key: str | None = None,
) -> str:
    """A token the service accepts (``python -m workers dev-token``)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "nbf": now, "exp": now + ttl}
    if settings.auth_jwt_issuer:
        claims["iss"] = settings.auth_jwt_issuer
    if settings.auth_jwt_audience:
        claims["aud"] = settings.auth_jwt_audience
    roles = [settings.auth_admin_role] if admin else []
    roles += [settings.auth_platform_role] if platform else []
    if roles:
        claims[settings.auth_role_claim] = roles
    if settings.auth_jwt_algorithm == "HS256":
        if not settings.auth_jwt_secret:
            raise ConfigError("set AUTH_JWT_SECRET to sign HS256 tokens")
        return jwt.encode(claims, settings.auth_jwt_secret, algorithm="HS256")
    if private_key is None:
        raise ConfigError(
            "RS256 tokens need --private-key FILE (the service holds only the public key)"
        )
    return jwt.encode(claims, Path(private_key).read_text(), algorithm="RS256")


#: Where ``make dev`` keeps its development signing secret, inside ``DATA_DIR``.
DEV_SECRET_FILE = "dev-jwt-secret"


def dev_secret(data_dir: Path, *, create: bool = False) -> str | None:
    """The development HS256 secret of this data directory: made once (mode 0600) by
    ``python -m workers dev`` for the API it starts, and read by ``dev-token`` so
    that the tokens it prints are accepted. None if there is none and ``create``
    is off. Never used when ``AUTH_JWT_SECRET`` or a public key is configured."""
    path = Path(data_dir) / DEV_SECRET_FILE
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if not create:
            return None
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secret + "\n")
    return secret
