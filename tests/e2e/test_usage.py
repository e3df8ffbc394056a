"""Usage and cost through the running service: what answers used is reported per user,
course and day, priced; a daily token budget refuses questions once spent."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest

from devtools.processes import Service
from rag.platform.settings import Settings
from rag.protection.auth import issue_token
from tests.e2e.test_service import ASK, poll
from tests.fixtures.fake_openai import FakeServer

pytestmark = pytest.mark.timeout(180)
SECRET = "u" * 40
PRICES = '{"gpt-4o-mini": {"input": 0.15, "output": 0.6}}'


def bearer(user: str, *, admin: bool = False) -> dict[str, str]:
    token = issue_token(Settings.from_env({"AUTH_JWT_SECRET": SECRET}), user, admin=admin)
    return {"Authorization": f"Bearer {token}"}


async def test_tokens_are_reported_priced_and_a_spent_budget_refuses(
    start: Callable[..., Service], fake_openai: FakeServer
) -> None:
    service = start(
        AUTH_JWT_SECRET=SECRET,
        MODEL_PRICES=PRICES,
        CHAT_MODEL="gpt-4o-mini",
        BUDGET_USER_DAILY_TOKENS="50",
    )
    await fake_openai.aconfigure(answer="Salt tightens the gluten network [1].")
    ann, bob, admin = bearer("ann"), bearer("bob"), bearer("root", admin=True)
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as http:
        jobs = []
        for who, question in ((ann, "What does salt do to dough?"), (bob, "Why add salt?")):
            accepted = await http.post(ASK, json={"question": question}, headers=who)
            assert accepted.status_code == 202, accepted.text
            jobs.append(await poll(http, accepted.json()["job_id"], who))
        assert all(job["served_by"] == "generated" for job in jobs)
        used = {"ann": jobs[0]["usage"], "bob": jobs[1]["usage"]}
        assert all(u["prompt_tokens"] > 50 for u in used.values())  # over the budget now

        # Ann's answer used more than her 50 tokens of today: her next question waits.
        refused = await http.post(ASK, json={"question": "And sugar?"}, headers=ann)
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "budget_exhausted"
        assert error["message"].startswith("your daily budget of 50 model tokens is used up")
        assert error["details"]["scope"] == "user" and error["details"]["limit"] == 50
        assert error["details"]["used"] == sum(used["ann"].values())
        assert 0 < int(refused.headers["retry-after"]) <= 86400

        report = await http.get("/v1/admin/usage", params={"group": "user"}, headers=admin)
        assert report.status_code == 200, report.text
        page = report.json()
        today = datetime.now(UTC).date().isoformat()
        assert (page["since"] <= today == page["until"]) and page["unpriced"] == []
        rows = {row["key"]: row for row in page["items"]}
        assert set(rows) == {"ann", "bob"}
        for user, tokens in used.items():
            row = rows[user]
            assert (row["jobs"], row["prompt_tokens"], row["completion_tokens"]) == (
                1, tokens["prompt_tokens"], tokens["completion_tokens"]
            )
            cost = (tokens["prompt_tokens"] * 0.15 + tokens["completion_tokens"] * 0.6) / 1e6
            assert row["cost_usd"] == pytest.approx(cost)
        by_course = await http.get("/v1/admin/usage", params={"group": "course"}, headers=admin)
        assert [r["key"] for r in by_course.json()["items"]] == ["bread-science"]
        assert by_course.json()["items"][0]["jobs"] == 2
        learner = await http.get("/v1/admin/usage", headers=ann)
        assert learner.status_code == 403
