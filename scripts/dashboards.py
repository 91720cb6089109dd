#!/usr/bin/env python3
"""Writes the Grafana dashboards the chart ships (charts/pipewright/dashboards/).

Each dashboard is declared here once, as rows of panels with their PromQL;
this script lays them out and writes the JSON Grafana imports. Run it after
changing a panel; `--check` fails when a committed file differs from what
this script writes (the end-to-end suite runs it).

Every query of every panel is run against a real Prometheus scraping a real
run by the end-to-end suite (e2e/prometheus.py), so a renamed metric fails
there.

Template variables: `datasource`, `namespace` and `run` (both multi-valued,
"All" by default). Run-scoped series carry `namespace` and `run` labels: the
chart's PodMonitor adds them from the pods.
"""

import argparse
import json
import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent.parent / "charts/pipewright/dashboards"

# The filter every run-scoped query carries.
F = 'namespace=~"$namespace", run=~"$run"'
RATE = "$__rate_interval"


def q(expr, legend=""):
    return {"expr": expr, "legend": legend}


def panel(kind, title, targets, unit="short", width=12, height=8, **extra):
    return {"kind": kind, "title": title, "targets": targets, "unit": unit,
            "w": width, "h": height, **extra}


def ts(title, targets, unit="short", width=12, **extra):
    return panel("timeseries", title, targets, unit, width, **extra)


def stat(title, targets, unit="short", width=4, **extra):
    return panel("stat", title, targets, unit, width, height=4, **extra)


DASHBOARDS = {
    "overview": {
        "title": "Pipewright / Run overview",
        "description": "Phase, progress, loss and throughput of each TrainingRun.",
        "rows": [
            [
                stat("Phase", [q(f"max by (phase) (pipewright_phase{{{F}}} == 1)", "{{phase}}")],
                     text_mode="name"),
                stat("Step", [q(f"max(pipewright_step{{{F}}})")]),
                stat("Progress", [q(f"max(pipewright_step{{{F}}}) / max(pipewright_run_steps{{{F}}})")],
                     unit="percentunit"),
                stat("Loss", [q(f"max(pipewright_loss{{{F}}})")], decimals=4),
                stat("Tokens per second", [q(f"sum(pipewright_tokens_per_second{{{F}}})")]),
                stat("Live shards", [q(f"sum(pipewright_workers_live{{{F}}})")]),
            ],
            [
                ts("Training loss", [q(f"max by (namespace, run) (pipewright_loss{{{F}}})",
                                       "{{namespace}}/{{run}}")]),
                ts("Tokens per second", [q(f"sum by (namespace, run) (pipewright_tokens_per_second{{{F}}})",
                                           "{{namespace}}/{{run}}")]),
            ],
            [
                ts("Steps per minute", [q(f"60 * max by (namespace, run) (deriv(pipewright_step{{{F}}}[{RATE}]))",
                                          "{{namespace}}/{{run}}")]),
                ts("Last stage's loss by replica", [q(f"max by (run, stage, replica) (pipewright_shard_loss{{{F}}})",
                                                      "{{run}} s{{stage}} r{{replica}}")]),
            ],
            [
                ts("Volunteers on standby", [q(f"sum by (namespace, run) (pipewright_standby_workers{{{F}}})",
                                               "{{namespace}}/{{run}}")]),
                ts("Last committed checkpoint", [q(f"max by (namespace, run) (pipewright_checkpoint_step{{{F}}})",
                                                   "{{namespace}}/{{run}}")]),
            ],
        ],
    },
    "pipeline": {
        "title": "Pipewright / Pipeline",
        "description": "Where each stage's time goes: step time, the bubble, and every shard's share of the work.",
        "rows": [
            [
                ts("Step time by stage (median)",
                   [q(f"histogram_quantile(0.5, sum by (stage, le) (rate(pipewright_shard_step_seconds_bucket{{{F}}}[{RATE}])))",
                      "stage {{stage}}")], unit="s"),
                ts("Bubble by stage (slowest worker's wait)",
                   [q(f"max by (stage) (pipewright_stage_bubble_ratio{{{F}}})", "stage {{stage}}")],
                   unit="percentunit"),
            ],
            [
                panel("status-history", "Idle fraction per shard (heat map)",
                      [q(f"sum by (stage, replica) (rate(pipewright_shard_idle_seconds_total{{{F}}}[{RATE}]))"
                         f" / sum by (stage, replica) (rate(pipewright_shard_step_seconds_sum{{{F}}}[{RATE}]))",
                         "s{{stage}} r{{replica}}")],
                      unit="percentunit", width=24),
            ],
            [
                ts("Compute, idle and update seconds per second, by stage",
                   [q(f"sum by (stage) (rate(pipewright_shard_busy_seconds_total{{{F}}}[{RATE}]))", "compute s{{stage}}"),
                    q(f"sum by (stage) (rate(pipewright_shard_idle_seconds_total{{{F}}}[{RATE}]))", "idle s{{stage}}"),
                    q(f"sum by (stage) (rate(pipewright_shard_update_seconds_total{{{F}}}[{RATE}]))", "update s{{stage}}")],
                   stack=True),
                ts("Micro-batches per second by shard",
                   [q(f"sum by (stage, replica) (rate(pipewright_shard_micro_batches_total{{{F}}}[{RATE}]))",
                      "s{{stage}} r{{replica}}")]),
            ],
            [
                ts("Seconds per micro-batch by shard (what routing weighs)",
                   [q(f"max by (stage, replica) (pipewright_shard_seconds_per_micro_batch{{{F}}})",
                      "s{{stage}} r{{replica}}")], unit="s"),
                ts("Micro-batches in each shard's last step",
                   [q(f"max by (stage, replica) (pipewright_shard_micro_batches{{{F}}})",
                      "s{{stage}} r{{replica}}")]),
            ],
        ],
    },
    "links": {
        "title": "Pipewright / Links",
        "description": "Bytes between stages and on the replicas' ring, and what was refused.",
        "rows": [
            [
                ts("Bytes sent per second by shard",
                   [q(f"sum by (stage, replica, link) (rate(pipewright_link_sent_bytes_total{{{F}}}[{RATE}]))",
                      "s{{stage}} r{{replica}} {{link}}")], unit="Bps"),
                ts("Bytes received per second by shard",
                   [q(f"sum by (stage, replica, link) (rate(pipewright_link_received_bytes_total{{{F}}}[{RATE}]))",
                      "s{{stage}} r{{replica}} {{link}}")], unit="Bps"),
            ],
            [
                ts("Refused frames by reason",
                   [q(f"sum by (reason) (increase(pipewright_link_refused_frames_total{{{F}}}[{RATE}]))",
                      "{{reason}}")]),
                ts("Refused step reports and registrations by reason",
                   [q(f"sum by (reason) (increase(pipewright_refused_reports_total{{{F}}}[{RATE}]))",
                      "{{reason}}")]),
            ],
            [
                ts("Coordinator API requests per second",
                   [q(f"sum by (path) (rate(pipewright_requests_total{{{F}}}[{RATE}]))", "{{path}}")],
                   unit="reqps"),
                ts("Rejected API requests per second (token, body)",
                   [q(f"sum by (namespace, run) (rate(pipewright_rejected_requests_total{{{F}}}[{RATE}]))",
                      "{{namespace}}/{{run}}")], unit="reqps"),
            ],
        ],
    },
    "faults": {
        "title": "Pipewright / Faults",
        "description": "Lost workers, reassigned shards, recoveries, heartbeats, audits, contribution audits and quarantines.",
        "rows": [
            [
                ts("Shards reassigned by the coordinator",
                   [q(f"sum by (namespace, run) (increase(pipewright_reassignments_total{{{F}}}[{RATE}]))",
                      "{{namespace}}/{{run}}")]),
                ts("Shard pods replaced by the operator",
                   [q(f"sum(increase(pipewright_operator_shard_reassignments_total[{RATE}]))", "operator")]),
            ],
            [
                ts("Recoveries",
                   [q(f"sum by (namespace, run) (increase(pipewright_recoveries_total{{{F}}}[{RATE}]))",
                      "{{namespace}}/{{run}}")]),
                ts("Mean seconds to recover",
                   [q(f"sum by (namespace, run) (increase(pipewright_recovery_seconds_total{{{F}}}[{RATE}]))"
                      f" / sum by (namespace, run) (increase(pipewright_recoveries_total{{{F}}}[{RATE}]))",
                      "{{namespace}}/{{run}}")], unit="s"),
            ],
            [
                ts("Live shards of wanted",
                   [q(f"sum by (namespace, run) (pipewright_shard_live{{{F}}})", "live {{run}}"),
                    q(f"count by (namespace, run) (pipewright_shard_live{{{F}}})", "wanted {{run}}")]),
                ts("Heartbeat age by shard",
                   [q(f"max by (stage, replica) (pipewright_shard_heartbeat_age_seconds{{{F}}})",
                      "s{{stage}} r{{replica}}")], unit="s"),
            ],
            [
                ts("Epoch (wiring generation)",
                   [q(f"max by (namespace, run) (pipewright_epoch{{{F}}})", "{{namespace}}/{{run}}")]),
                ts("Quarantined workers",
                   [q(f"max by (namespace, run) (pipewright_quarantined_workers{{{F}}})",
                      "{{namespace}}/{{run}}")]),
            ],
            [
                ts("Audits per second by stage and outcome",
                   [q(f"sum by (namespace, run, stage, outcome) "
                      f"(rate(pipewright_audits_total{{{F}}}[{RATE}]))",
                      "{{run}} s{{stage}} {{outcome}}")], unit="ops"),
                ts("Chain mismatches by stage (a sender's output hash is not its receiver's input hash)",
                   [q(f"sum by (namespace, run, stage) "
                      f"(increase(pipewright_chain_mismatches_total{{{F}}}[{RATE}]))",
                      "{{run}} s{{stage}}")]),
            ],
            [
                ts("Contribution audits per second by stage and outcome (robust aggregation)",
                   [q(f"sum by (namespace, run, stage, outcome) "
                      f"(rate(pipewright_contribution_audits_total{{{F}}}[{RATE}]))",
                      "{{run}} s{{stage}} {{outcome}}")], unit="ops"),
                ts("Suspect contributions reported by stage and reason",
                   [q(f"sum by (namespace, run, stage, reason) "
                      f"(increase(pipewright_contribution_suspicions_total{{{F}}}[{RATE}]))",
                      "{{run}} s{{stage}} {{reason}}")]),
            ],
        ],
    },
    "contributions": {
        "title": "Pipewright / Contributions",
        "description": "The ledger's verified work and each contributor's reward share.",
        "rows": [
            [
                ts("Reward share by contributor",
                   [q(f"max by (worker) (pipewright_reward_share{{{F}}})", "{{worker}}")],
                   unit="percentunit", stack=True),
                ts("Verified FLOP/s by contributor",
                   [q(f"sum by (worker) (rate(pipewright_contribution_flops_total{{{F}}}[{RATE}]))",
                      "{{worker}}")], unit="flops"),
            ],
            [
                panel("table", "Who holds each shard",
                      [q(f"max by (run, stage, replica, name, identity) (pipewright_shard_info{{{F}}})")],
                      width=24, instant=True),
            ],
        ],
    },
    "operator": {
        "title": "Pipewright / Operator",
        "description": "The operator's reconciles, their errors and latency, and runs by phase.",
        "rows": [
            [
                ts("Runs by phase", [q("sum by (phase) (pipewright_operator_runs)", "{{phase}}")]),
                ts("Reconciles per second",
                   [q(f"sum(rate(pipewright_operator_reconciles_total[{RATE}]))", "reconciles"),
                    q(f"sum(rate(pipewright_operator_reconcile_errors_total[{RATE}]))", "errors")],
                   unit="ops"),
            ],
            [
                ts("Reconcile duration",
                   [q(f"histogram_quantile(0.99, sum by (le) (rate(pipewright_operator_reconcile_duration_seconds_bucket[{RATE}])))", "p99"),
                    q(f"histogram_quantile(0.5, sum by (le) (rate(pipewright_operator_reconcile_duration_seconds_bucket[{RATE}])))", "p50")],
                   unit="s"),
                ts("Shard pods replaced",
                   [q(f"sum(increase(pipewright_operator_shard_reassignments_total[{RATE}]))", "replaced")]),
            ],
        ],
    },
}


def variables():
    def query_var(name, label, query):
        return {
            "name": name, "label": label, "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query,
            "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "refresh": 2, "sort": 1, "hide": 0,
        }
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0},
        query_var("namespace", "Namespace", "label_values(pipewright_step, namespace)"),
        query_var("run", "Run", 'label_values(pipewright_step{namespace=~"$namespace"}, run)'),
    ]


def render_panel(p, pid, x, y):
    out = {
        "id": pid,
        "type": p["kind"],
        "title": p["title"],
        "gridPos": {"h": p["h"], "w": p["w"], "x": x, "y": y},
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "expr": t["expr"],
                "legendFormat": t["legend"] or "__auto",
                **({"instant": True, "range": False, "format": "table"} if p.get("instant") else {}),
            }
            for i, t in enumerate(p["targets"])
        ],
        "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
    }
    if "decimals" in p:
        out["fieldConfig"]["defaults"]["decimals"] = p["decimals"]
    if p["kind"] == "stat":
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": p.get("text_mode", "value"), "colorMode": "none", "graphMode": "area",
        }
    elif p["kind"] == "timeseries":
        out["fieldConfig"]["defaults"]["custom"] = {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if p.get("stack") else 0,
            "stacking": {"mode": "normal" if p.get("stack") else "none", "group": "A"},
        }
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    elif p["kind"] == "status-history":
        out["fieldConfig"]["defaults"]["color"] = {"mode": "continuous-GrYlRd"}
        out["fieldConfig"]["defaults"]["min"] = 0
        out["fieldConfig"]["defaults"]["max"] = 1
        out["options"] = {"showValue": "never", "rowHeight": 0.9, "colWidth": 0.9,
                          "legend": {"displayMode": "list", "placement": "bottom"}}
    elif p["kind"] == "table":
        out["transformations"] = [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True}}}]
    return out


def render(key, d):
    panels, y, pid = [], 0, 1
    for row in d["rows"]:
        x, height = 0, 0
        for p in row:
            if x + p["w"] > 24:
                x, y = 0, y + height
                height = 0
            panels.append(render_panel(p, pid, x, y))
            pid += 1
            x += p["w"]
            height = max(height, p["h"])
        y += height
    return {
        "uid": f"pipewright-{key}",
        "title": d["title"],
        "description": d["description"],
        "tags": ["pipewright"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "links": [{"type": "dashboards", "tags": ["pipewright"], "asDropdown": True,
                   "title": "Pipewright", "includeVars": True, "keepTime": True}],
        "templating": {"list": variables()},
        "annotations": {"list": []},
        "panels": panels,
    }


def files():
    return {f"pipewright-{k}.json": json.dumps(render(k, d), indent=2) + "\n" for k, d in DASHBOARDS.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a committed dashboard is stale")
    args = ap.parse_args()
    want = files()
    have = {p.name for p in OUT.glob("*.json")}
    if args.check:
        stale = [n for n, text in want.items()
                 if not (OUT / n).exists() or (OUT / n).read_text() != text]
        extra = sorted(have - set(want))
        if stale or extra:
            print(f"dashboards out of date: {stale + extra}; run scripts/dashboards.py", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for n in have - set(want):
        (OUT / n).unlink()
    for n, text in want.items():
        (OUT / n).write_text(text)
    print(f"wrote {len(want)} dashboards to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
