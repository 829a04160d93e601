"""The monitoring bundle against a real Prometheus (the Debian package; skipped where it is not
installed): it scrapes a running agent (standalone mode) that downloads one model, fails another
(a repository that does not exist, retried), and a running controller (standalone mode, over the
same caches and a node of their group); every dashboard query over the agent's and the controller's
metrics then returns data through the HTTP API (refusals excepted: that counter has no series before
a first refusal), and the alert rules load.

The dashboard's queries over kube-state-metrics' LocalModelCache series need kube-state-metrics and a
cluster; they are checked for syntax only (Prometheus parses them and answers an empty result)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.agents import cache_doc, eventually, group_doc
from tests.support.hfhub import Hub

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "manifests" / "monitoring" / "dashboard.json"
ALERTS = ROOT / "manifests" / "monitoring" / "alerts.yaml"
MiB = 1 << 20

prometheus = shutil.which("prometheus")
promtool = shutil.which("promtool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def grafana_substitute(expr: str) -> str:
    """What Grafana sends for this dashboard's variables: all nodes, a short range for a test."""
    return (
        expr.replace("$node", ".*")
        .replace("$__rate_interval", "20s")
        .replace("$__range", "5m")
        .replace("$__interval", "5s")
    )


def rule_groups() -> dict[str, Any]:
    return {"groups": yaml.safe_load(ALERTS.read_text())["spec"]["groups"]}


def test_dashboard_covers_the_agent_and_controller_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from agent.metrics import AgentMetrics
    from controller.metrics import ControllerMetrics

    registry = CollectorRegistry()
    AgentMetrics(registry)
    ControllerMetrics(registry)
    names = {m.name for m in registry.collect()}
    text = " ".join(expr for _, expr in dashboard_queries())
    missing = {n for n in names if not re.search(rf"\b{re.escape(n)}(_total|_bucket)?\b", text)}
    assert not missing, f"metrics with no dashboard panel: {sorted(missing)}"
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "node"}


@pytest.mark.skipif(promtool is None, reason="promtool (Debian package prometheus) is not installed")
def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    assert promtool is not None
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule_groups()))
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    names = {r["alert"] for g in rule_groups()["groups"] for r in g["rules"]}
    assert {
        "ModelcacheDownloadFailing",
        "ModelcacheDiskAlmostFull",
        "ModelcacheNoReadyCopy",
        "ModelcacheNodeGroupNoReadyCopy",
    } <= names


@pytest.mark.skipif(prometheus is None, reason="prometheus (Debian package) is not installed")
async def test_prometheus_scrapes_an_agent_and_the_dashboard_has_data(hf_hub: Hub, tmp_path: Path) -> None:
    assert prometheus is not None
    hf_hub.add_repo("org/ok", {"w.safetensors": os.urandom(6 * MiB), "config.json": b"{}"})
    hf_hub.file("org/ok", "w.safetensors").rate = 2 * MiB  # spans a few scrapes: rates are non-zero
    cache = tmp_path / "cache"
    docs = tmp_path / "docs.yaml"
    docs.write_text(
        yaml.safe_dump_all(
            [
                group_doc("h100", limit="20Mi", path=cache),
                cache_doc("ok", "hf://org/ok", "10Mi", ["h100"]),
                cache_doc("missing", "hf://org/missing", "1Mi", ["h100"]),
            ]
        )
    )
    # The controller's documents: the same group and caches, and a Node in the group (the agent's
    # standalone mode takes no Nodes). No agent reports to this controller: no copy is ever ready.
    controller_docs = tmp_path / "controller.yaml"
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "box", "labels": {"gpu": "h100"}}}
    controller_docs.write_text(yaml.safe_dump_all([*yaml.safe_load_all(docs.read_text()), node]))
    metrics_port, prom_port, controller_port = free_port(), free_port(), free_port()
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(rule_groups()))
    config = tmp_path / "prometheus.yml"
    target = {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"node": "box"}}  # as the PodMonitor
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {"job_name": "modelcache-agent", "static_configs": [target]},
                    {
                        "job_name": "modelcache-controller",
                        "static_configs": [{"targets": [f"127.0.0.1:{controller_port}"]}],
                    },
                ],
            }
        )
    )
    prom = await asyncio.create_subprocess_exec(
        prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    agent: asyncio.subprocess.Process | None = None
    controller: asyncio.subprocess.Process | None = None
    base = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        async with aiohttp.ClientSession() as http:

            async def query(expr: str) -> list[dict[str, Any]] | None:
                try:
                    async with http.get(f"{base}/query", params={"query": expr}) as r:
                        body = await r.json()
                except (aiohttp.ClientError, ValueError):
                    return None
                assert body["status"] == "success", (expr, body)
                return list(body["data"]["result"])

            async def has(expr: str) -> bool:
                return bool(await query(expr))

            # Prometheus first, the agent once it scrapes: counters are seen rising from zero.
            await eventually(lambda: has('up{job="modelcache-agent"}'), timeout=30, what="Prometheus up")
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "modelcache", "agent", "--node-name", "box", "--cache-dir", str(cache),
                "--standalone", str(docs), "--node-labels", "gpu=h100", "--health-addr", "off",
                "--metrics-addr", f"127.0.0.1:{metrics_port}", "--retry-min", "1", "--retry-max", "2",
                "--chunk-size", "1Mi", "--log-level", "ERROR",
                env=dict(os.environ, HF_ENDPOINT=hf_hub.endpoint, HF_HUB_DISABLE_XET="1"),
            )  # fmt: skip
            controller = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "modelcache", "controller", "--standalone", str(controller_docs),
                "--metrics-addr", f"127.0.0.1:{controller_port}", "--resync", "1", "--log-level", "ERROR",
            )  # fmt: skip
            await eventually(lambda: has('up{job="modelcache-agent"} == 1'), timeout=30, what="first scrape")
            await eventually(
                lambda: has('up{job="modelcache-controller"} == 1'), timeout=30, what="controller scraped"
            )
            await eventually(lambda: has("modelcache_models_cached == 1"), timeout=30, what="model cached")
            await eventually(
                lambda: has("sum(modelcache_download_failures_total) >= 2"),
                timeout=30,
                what="retried failures",
            )
            await eventually(
                lambda: has("sum(rate(modelcache_controller_reconciles_total[20s])) > 0"),
                timeout=30,
                what="controller reconciles",
            )
            await asyncio.sleep(2)  # a few more scrapes after the last change

            empty = []
            for title, expr in dashboard_queries():
                result = await query(grafana_substitute(expr))
                assert result is not None, (title, expr)
                labelled = ("modelcache_refusals_total", "modelcache_peer_requests_total")
                if "kube_customresource_" in expr or any(name in expr for name in labelled):
                    # kube-state-metrics series, and labelled counters with no refusal or peer request
                    # yet: parsed (status success) but no series exist here.
                    continue
                if not any(_has_number(s) for s in result):
                    empty.append((title, expr))
            assert not empty, f"dashboard queries with no data: {empty}"

            # The throughput panel saw bytes move; the duration panel saw one download.
            rate = await query("max_over_time(sum(rate(modelcache_downloaded_bytes_total[5s]))[1m:1s])")
            assert rate and float(rate[0]["value"][1]) > 0
            count = await query("sum(increase(modelcache_download_duration_seconds_count[5m]))")
            assert count and float(count[0]["value"][1]) > 0

            async with http.get(f"{base}/rules") as r:
                groups = (await r.json())["data"]["groups"]
            loaded = {rule["name"]: rule for g in groups for rule in g["rules"]}
            assert {
                "ModelcacheDownloadFailing",
                "ModelcacheDiskAlmostFull",
                "ModelcacheNoReadyCopy",
                "ModelcacheNodeGroupNoReadyCopy",
            } <= loaded.keys()
            assert all(rule["health"] in ("ok", "unknown") for rule in loaded.values()), loaded
            # The failing half of ModelcacheDownloadFailing holds (the completed model keeps the whole
            # rule from applying to this node, and its `for` is an hour).
            assert await has("sum by (node) (increase(modelcache_download_failures_total[1h])) > 0")
            # ModelcacheNodeGroupNoReadyCopy's expression holds for both caches in h100 (its `for`
            # is 30 minutes): the controller placed them on "box", which never reports a copy.
            (rule,) = [
                r
                for g in rule_groups()["groups"]
                for r in g["rules"]
                if r.get("alert") == "ModelcacheNodeGroupNoReadyCopy"
            ]
            firing = await query(rule["expr"])
            assert firing is not None
            assert {(s["metric"]["cache"], s["metric"]["group"]) for s in firing} == {
                ("ok", "h100"),
                ("missing", "h100"),
            }
    finally:
        for proc in (agent, controller, prom):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (agent, controller):
            if proc is not None:
                await asyncio.wait_for(proc.wait(), 15)
        try:
            await asyncio.wait_for(prom.wait(), 15)
        except TimeoutError:
            prom.kill()
            await prom.wait()


def _has_number(sample: dict[str, Any]) -> bool:
    value = sample.get("value", [None, "NaN"])[1]
    return value not in ("NaN", "+Inf", "-Inf")
