"""Authentication: bearer JWTs (HS256 and RS256), stream tokens, enrollment."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from arq.connections import ArqRedis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from rag.content.catalog import set_enrollment
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.platform.db import Database
from rag.platform.errors import ConfigError
from rag.platform.redis import create_redis
from rag.platform.settings import Settings
from rag.protection.auth import Authenticator, issue_token
from tests.fixtures.services import make_settings
from tests.rag.test_indexing import TOPICS, write_course

Client = AsyncTestClient[Litestar]
SECRET = "s" * 40
URL = "/v1/courses/test-course/questions"
HS = {
    "AUTH_JWT_SECRET": SECRET,
    "AUTH_JWT_ISSUER": "https://login.example",
    "AUTH_JWT_AUDIENCE": "course-assistant",
}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "iss": "https://login.example",
        "aud": "course-assistant",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def hs(**overrides: Any) -> dict[str, str]:
    return bearer(jwt.encode(claims(**overrides), SECRET, algorithm="HS256"))


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
async def course(db: Database, tmp_path: Path) -> int:
    await import_course(db, load_course(write_course(tmp_path / "c", TOPICS)))
    course_id: int = await db.fetch_value("SELECT id FROM courses")
    await db.execute(
        "INSERT INTO enrollments (user_id, course_id) VALUES ('alice', %s)", (course_id,)
    )
    return course_id


async def _client(settings: Settings, database_url: str, redis_url: str) -> AsyncIterator[Client]:
    app = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        yield client


@pytest.fixture
async def client(course: int, database_url: str, redis_url: str) -> AsyncIterator[Client]:
    async for c in _client(make_settings(**HS), database_url, redis_url):
        yield c


async def test_a_valid_token_identifies_the_user(client: Client) -> None:
    asked = await client.post(URL, json={"question": "What is bulk?"}, headers=hs())
    assert asked.status_code == 202, asked.text
    job = await client.get(f"/v1/jobs/{asked.json()['job_id']}", headers=hs())
    assert job.status_code == 200
    # Another user's valid token: the job does not exist for them.
    other = await client.get(f"/v1/jobs/{asked.json()['job_id']}", headers=hs(sub="bob"))
    assert other.status_code == 404


def _rsa_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims(), key, algorithm="RS256")


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "authentication is required"),
        ({"Authorization": "Basic YWxpY2U6cHc="}, "send Authorization: Bearer"),
        ({"Authorization": "Bearer "}, "send Authorization: Bearer"),
        (bearer("not.a.jwt"), "not a well-formed JWT"),
        (bearer(f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims())}."), "signed with HS256"),
        (bearer(_rsa_token()), "signed with HS256"),
        (bearer(jwt.encode(claims(), "t" * 40, algorithm="HS256")), "signature does not verify"),
        (hs(exp=int(time.time()) - 120), "has expired"),
        (hs(nbf=int(time.time()) + 600), "not valid yet"),
        (hs(aud="another-service"), "another audience"),
        (hs(iss="https://evil.example"), "unexpected issuer"),
        (hs(exp=None), "lacks the 'exp' claim"),
        (hs(sub=None), "lacks the 'sub' claim"),
        (hs(sub="has spaces"), "subject must be"),
        # With bearer tokens configured, the development header is not trusted.
        ({"X-User-Id": "alice"}, "authentication is required"),
    ],
)
async def test_bad_tokens_are_401_with_a_clear_message(
    client: Client, db: Database, headers: dict[str, str], message: str
) -> None:
    response = await client.post(URL, json={"question": "What is bulk?"}, headers=headers)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == "unauthorized" and message in error["message"], error
    assert response.headers["www-authenticate"] == "Bearer"
    assert await db.fetch_value("SELECT count(*) FROM assistant_jobs") == 0


async def test_a_tampered_token_is_refused(client: Client) -> None:
    header, _payload, signature = hs()["Authorization"].removeprefix("Bearer ").split(".")
    forged = f"{header}.{_b64(claims(sub='mallory'))}.{signature}"
    response = await client.post(URL, json={"question": "hi"}, headers=bearer(forged))
    assert response.status_code == 401
    assert "signature does not verify" in response.json()["error"]["message"]


async def test_rs256_with_a_public_key(
    course: int, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = tmp_path / "private.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = make_settings(
        AUTH_JWT_ALGORITHM="RS256",
        AUTH_JWT_PUBLIC_KEY=public.decode(),
        STREAM_TOKEN_SECRET="k" * 32,
    )
    good = issue_token(settings, "alice", private_key=str(private))
    async for client in _client(settings, database_url, redis_url):
        ok = await client.post(URL, json={"question": "What is bulk?"}, headers=bearer(good))
        assert ok.status_code == 202, ok.text
        # The classic confusion attack: HS256 "signed" with the public key as secret.
        header = _b64({"alg": "HS256", "typ": "JWT"})
        body = _b64(claims(iss=None, aud=None))
        mac = hmac.new(public, f"{header}.{body}".encode(), hashlib.sha256).digest()
        confused = f"{header}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
        refused = await client.post(URL, json={"question": "hi"}, headers=bearer(confused))
        assert refused.status_code == 401
        assert "signed with RS256" in refused.json()["error"]["message"]


def test_rs256_needs_a_stream_token_secret() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ConfigError, match="STREAM_TOKEN_SECRET"):
        Authenticator(
            make_settings(AUTH_JWT_ALGORITHM="RS256", AUTH_JWT_PUBLIC_KEY=public.decode())
        )
    with pytest.raises(ConfigError, match="at least 32 characters"):
        make_settings(AUTH_JWT_SECRET="short")


async def test_admins_are_marked_by_their_role_claim(client: Client, course: int) -> None:
    # carol is not enrolled: refused as a learner, admitted as an administrator.
    learner = await client.post(URL, json={"question": "What?"}, headers=hs(sub="carol"))
    assert learner.status_code == 403
    admin = await client.post(
        URL, json={"question": "What?"}, headers=hs(sub="carol", roles=["admin"])
    )
    assert admin.status_code == 202, admin.text


async def test_asking_needs_an_enrollment(client: Client, db: Database, arq: ArqRedis) -> None:
    response = await client.post(URL, json={"question": "What?"}, headers=hs(sub="bob"))
    assert response.status_code == 403
    assert response.json()["error"] == {
        "code": "forbidden",
        "message": "you are not enrolled in the course 'test-course'",
        "details": {},
    }
    assert await db.fetch_value("SELECT count(*) FROM assistant_jobs") == 0
    assert await arq.queued_jobs() == []


async def test_stream_tokens_open_one_job_for_a_while(
    client: Client, course: int, redis_url: str
) -> None:
    asked = (await client.post(URL, json={"question": "What is bulk?"}, headers=hs())).json()
    job_id = asked["job_id"]
    events_url = asked["events_url"]
    token = events_url.split("token=", 1)[1]
    # The cancel publishes a terminal event, so an open stream ends at once.
    await client.delete(f"/v1/jobs/{job_id}", headers=hs())
    opened = await client.get(events_url)  # no Authorization: the token is enough
    assert opened.status_code == 200 and "event: error" in opened.text
    other = (await client.post(URL, json={"question": "Why?"}, headers=hs())).json()["job_id"]
    reused = await client.get(f"/v1/jobs/{other}/events?token={token}")
    assert reused.status_code == 401
    assert "another job" in reused.json()["error"]["message"]
    forged = await client.get(f"/v1/jobs/{job_id}/events?token={token[:-4]}AAAA")
    assert forged.status_code == 401
    auth = Authenticator(make_settings(**HS))
    expired = auth.stream_token("alice", uuid.UUID(job_id), now=time.time() - 3600)
    late = await client.get(f"/v1/jobs/{job_id}/events?token={expired}")
    assert late.status_code == 401 and "expired" in late.json()["error"]["message"]
    # A bearer token is not a stream token (other audience), nor the reverse.
    bearer_token = hs()["Authorization"].removeprefix("Bearer ")
    as_stream = await client.get(f"/v1/jobs/{job_id}/events?token={bearer_token}")
    assert as_stream.status_code == 401
    assert (await client.get(f"/v1/jobs/{job_id}", headers=bearer(token))).status_code == 401


async def test_a_stream_token_opens_nothing_for_another_signed_in_user(
    client: Client, course: int
) -> None:
    """An outside test: bob, signed in, opened alice's events_url and got 200."""
    asked = (await client.post(URL, json={"question": "What is bulk?"}, headers=hs())).json()
    await client.delete(f"/v1/jobs/{asked['job_id']}", headers=hs())  # the stream ends at once
    events_url = asked["events_url"]
    theirs = await client.get(events_url, headers=hs(sub="bob"))
    assert theirs.status_code == 404, theirs.text
    assert theirs.json()["error"] == {
        "code": "not_found",
        "message": f"no job {asked['job_id']}",
        "details": {},
    }
    # The token alone (EventSource), or with its own user's identity, still opens it.
    for headers in ({}, hs()):
        mine = await client.get(events_url, headers=headers)
        assert mine.status_code == 200 and "event: error" in mine.text
    # An invalid identity beside a valid token is refused as invalid, not ignored.
    assert (await client.get(events_url, headers=bearer("garbage"))).status_code == 401


async def test_an_enrollment_change_reaches_the_cached_answer_at_once(
    client: Client, db: Database, redis_url: str
) -> None:
    """The API caches "bob is not enrolled" for a minute; enrolling him drops that."""
    refused = await client.post(URL, json={"question": "What?"}, headers=hs(sub="bob"))
    assert refused.status_code == 403
    redis = create_redis(make_settings(), redis_url)
    try:
        assert await set_enrollment(db, redis, "bob", "test-course", enrolled=True, role="learner")
        for _ in range(50):  # pub/sub delivery is asynchronous
            admitted = await client.post(URL, json={"question": "What?"}, headers=hs(sub="bob"))
            if admitted.status_code == 202:
                break
            await asyncio.sleep(0.02)
        assert admitted.status_code == 202, admitted.text
        await set_enrollment(db, redis, "bob", "test-course", enrolled=False, role="learner")
        for _ in range(50):
            again = await client.post(URL, json={"question": "What?"}, headers=hs(sub="bob"))
            if again.status_code == 403:
                break
            await asyncio.sleep(0.02)
        assert again.status_code == 403
    finally:
        await redis.aclose()


async def test_a_stream_token_is_never_a_bearer_token(
    course: int, database_url: str, redis_url: str
) -> None:
    """Without an audience setting too: stream tokens leak into access logs."""
    settings = make_settings(AUTH_JWT_SECRET=SECRET)
    async for client in _client(settings, database_url, redis_url):
        plain = bearer(jwt.encode(claims(iss=None, aud=None), SECRET, algorithm="HS256"))
        asked = await client.post(URL, json={"question": "What is bulk?"}, headers=plain)
        assert asked.status_code == 202, asked.text
        token = asked.json()["events_url"].split("token=", 1)[1]
        misused = await client.get(f"/v1/jobs/{asked.json()['job_id']}", headers=bearer(token))
        assert misused.status_code == 401, misused.text
        # Even a stream-shaped token signed with the bearer secret is refused.
        shaped = jwt.encode(claims(iss=None, aud=None, job="x"), SECRET, algorithm="HS256")
        refused = await client.get(f"/v1/jobs/{asked.json()['job_id']}", headers=bearer(shaped))
        assert refused.status_code == 401
        assert refused.json()["error"]["message"] == "a stream token is not a bearer token"
