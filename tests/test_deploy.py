"""The deployment files: the image, compose.yaml and the monitoring in deploy/.

Nothing here can run docker; these tests parse the files and check them against the
code: every setting compose passes exists, every metric an alert or a dashboard
panel reads is one the processes expose, the scrape ports are the ones configured.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from rag.platform.settings import FIELDS, Settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {field.env for field in FIELDS}
_METRIC = re.compile(r"\b((?:course_assistant|process)_[a-z_]+)")
_SUFFIX = re.compile(r"_(?:bucket|count|sum|total|created)$")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_the_image_is_multi_stage_installs_the_lock_and_runs_unprivileged() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2 and " AS build" in stages[0]
    final = lines[lines.index(stages[-1]) :]
    assert any("--from=build" in line for line in final)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    installs = " ".join(line for line in lines if "pip install" in line)
    assert "--require-hashes --no-deps -r requirements/base.txt" in installs
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = [part for part in line.split()[1:] if not part.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".data"} <= set(ignored)


def test_compose_runs_every_part_with_settings_that_exist() -> None:
    services = compose()["services"]
    assert {"postgres", "pgbouncer", "redis", "migrate", "api", "worker", "prometheus"} <= set(
        services
    )
    for name in ("migrate", "api", "worker"):
        service = services[name]
        assert service["build"] == "."
        unknown = set(service["environment"]) - SETTINGS
        assert not unknown, f"{name} passes settings the service does not read: {unknown}"
    # The app goes through PgBouncer in transaction pooling; migrations do not (their
    # advisory lock is per session).
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert "@pgbouncer:" in env["DATABASE_URL"] and env["DB_PGBOUNCER"] == "true"
    assert "@postgres:" in services["migrate"]["environment"]["DATABASE_URL"]
    assert services["migrate"]["environment"]["DB_PGBOUNCER"] == "false"
    assert services["pgbouncer"]["environment"]["POOL_MODE"] == "transaction"
    assert services["worker"]["command"] == ["python", "-m", "workers", "run"]
    for volume in services["prometheus"]["volumes"]:
        source = volume.split(":")[0]
        assert (ROOT / source).is_file(), source


def test_prometheus_scrapes_the_ports_the_processes_serve_metrics_on() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    ports = {
        job["job_name"]: job["dns_sd_configs"][0]["port"] for job in config["scrape_configs"]
    }
    services = compose()["services"]
    assert ports["api"] == int(services["api"]["environment"]["API_PORT"])
    assert ports["worker"] == int(services["worker"]["environment"]["WORKER_METRICS_PORT"])
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    rules = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    # What the issue asked alerts for: queue age, failure rate, breaker open, requeues.
    assert {"QuestionsWaitInTheQueue", "QuestionsFail", "ProviderBreakerOpen",
            "ReconcilerRequeuesJobs"} <= names  # fmt: skip


async def test_alerts_and_dashboard_read_only_metrics_the_processes_expose(
    settings: Settings, database_url: str, redis_url: str
) -> None:
    app = create_app(settings, database_url=database_url, redis_url=redis_url)
    async with AsyncTestClient(app=app) as client:
        assert (await client.get("/ready")).status_code == 200  # the HTTP metrics exist now
        scraped = (await client.get("/metrics")).text
    exposed = {_SUFFIX.sub("", f.name) for f in text_string_to_metric_families(scraped)}
    rules = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    named = {_SUFFIX.sub("", name) for expr in exprs for name in _METRIC.findall(expr)}
    assert len(named) > 15
    assert named - exposed == set(), "alerts or dashboard name metrics nothing exposes"
