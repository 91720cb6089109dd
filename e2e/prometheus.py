#!/usr/bin/env python3
"""A real Prometheus for the end-to-end suite, scraping what the chart's
monitors describe, and a check that every dashboard panel returns data.

  targets  reads the chart's rendered ServiceMonitor and PodMonitor, finds
           the Services and pods they select in the cluster (kubectl), and
           writes Prometheus file_sd target files, one per monitor, with
           the labels prometheus-operator would give each target (job,
           namespace, pod, container, endpoint, service) and the monitor's
           relabelings applied. Each pod's address is where e2e/kubelet.py
           runs it (its ADDRESSES file); a Service whose pods are played by
           a process of the suite (the operator) is given with --serve.
           With --loop it rewrites the files every second until killed.
  config   writes prometheus.yml: one job per monitor over its target file,
           every 1 s (the monitors' own intervals are minutes of a real
           cluster; the run here lasts half a minute).
  check    runs the query of every panel of every dashboard on Prometheus
           at one instant, template variables substituted, and fails
           naming each panel that returned no data; also checks the
           template variables' own queries and that every run-scoped
           series carries `namespace` and `run`.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import yaml


def kubectl_json(*args):
    out = subprocess.run(["kubectl", *args, "-o", "json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def monitors(rendered):
    """The ServiceMonitors and PodMonitors of a `helm template` output."""
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return [d for d in docs if d.get("kind") in ("ServiceMonitor", "PodMonitor")]


def selects(selector, labels):
    """Whether a Kubernetes label selector selects `labels`."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def in_namespaces(ns_selector, monitor_ns, ns):
    if ns_selector.get("any"):
        return True
    names = ns_selector.get("matchNames")
    return ns in names if names else ns == monitor_ns


def sanitize(name):
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def relabel(labels, rules):
    """Prometheus relabelling (replace, keep, drop); None when dropped."""
    for r in rules or []:
        action = r.get("action", "replace").lower()
        value = r.get("separator", ";").join(labels.get(s, "") for s in r.get("sourceLabels", []))
        m = re.fullmatch(r.get("regex", "(.*)"), value)
        if action == "keep" and not m:
            return None
        if action == "drop" and m:
            return None
        if action == "replace" and m:
            target = r["targetLabel"]
            out = m.expand(r.get("replacement", "$1").replace("$", "\\"))
            if out:
                labels[target] = out
            else:
                labels.pop(target, None)
    return labels


def pod_targets(mon, pods, addresses):
    spec, meta = mon["spec"], mon["metadata"]
    out = []
    for pod in pods:
        pm = pod["metadata"]
        if pod.get("status", {}).get("phase") != "Running":
            continue  # prometheus-operator leaves finished pods out
        if not in_namespaces(spec.get("namespaceSelector", {}), meta["namespace"], pm["namespace"]):
            continue
        if not selects(spec["selector"], pm.get("labels") or {}):
            continue
        host = addresses.get(pm["name"])
        if not host:
            continue  # not started by the kubelet stand-in yet
        for ep in spec["podMetricsEndpoints"]:
            for c in pod["spec"]["containers"]:
                for port in c.get("ports") or []:
                    if port.get("name") != ep["port"]:
                        continue
                    meta_labels = {f"__meta_kubernetes_pod_label_{sanitize(k)}": v
                                   for k, v in (pm.get("labels") or {}).items()}
                    labels = {
                        **meta_labels,
                        "job": f"{meta['namespace']}/{meta['name']}",
                        "namespace": pm["namespace"],
                        "pod": pm["name"],
                        "container": c["name"],
                        "endpoint": ep["port"],
                    }
                    labels = relabel(labels, ep.get("relabelings"))
                    if labels is None:
                        continue
                    labels = {k: v for k, v in labels.items() if not k.startswith("__")}
                    out.append({"targets": [f"{host}:{port['containerPort']}"], "labels": labels,
                                "path": ep.get("path", "/metrics")})
    return out


def service_targets(mon, services, served):
    spec, meta = mon["spec"], mon["metadata"]
    out = []
    for svc in services:
        sm = svc["metadata"]
        if not in_namespaces(spec.get("namespaceSelector", {}), meta["namespace"], sm["namespace"]):
            continue
        if not selects(spec["selector"], sm.get("labels") or {}):
            continue
        key = f"{sm['namespace']}/{sm['name']}"
        for ep in spec["endpoints"]:
            ports = [p for p in svc["spec"].get("ports") or [] if p.get("name") == ep["port"]]
            if not ports:
                sys.exit(f"{mon['kind']} {meta['name']}: Service {key} has no port named {ep['port']!r}")
            if key not in served:
                sys.exit(f"{mon['kind']} {meta['name']} selects Service {key}; say where its pods are served with --serve")
            labels = {"job": sm["name"], "namespace": sm["namespace"], "service": sm["name"],
                      "endpoint": ep["port"]}
            labels = relabel(labels, ep.get("relabelings"))
            if labels is not None:
                out.append({"targets": [served[key]], "labels": labels, "path": ep.get("path", "/metrics")})
    return out


def file_name(mon):
    return f"{mon['kind'].lower()}-{mon['metadata']['name']}.json"


def write_targets(args, mons):
    addresses = {}
    if os.path.exists(args.addresses):
        with open(args.addresses) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    addresses[parts[0]] = parts[1]
    served = dict(s.split("=", 1) for s in args.serve)
    pods = kubectl_json("get", "pods", "-A")["items"]
    services = kubectl_json("get", "services", "-A")["items"]
    for mon in mons:
        if mon["kind"] == "PodMonitor":
            targets = pod_targets(mon, pods, addresses)
        else:
            targets = service_targets(mon, services, served)
        for t in targets:
            if t.pop("path") != "/metrics":
                sys.exit(f"{mon['metadata']['name']}: only /metrics is scraped here")
        path = os.path.join(args.dir, file_name(mon))
        with open(path + ".tmp", "w") as f:
            json.dump(targets, f, indent=1)
        os.replace(path + ".tmp", path)


def cmd_targets(args):
    mons = monitors(args.rendered)
    if not mons:
        sys.exit(f"{args.rendered} renders no ServiceMonitor or PodMonitor")
    while True:
        try:
            write_targets(args, mons)
        except (subprocess.CalledProcessError, SystemExit) as e:
            if not args.loop:
                raise
            # Logged and tried again: the check then names what is missing.
            print(f"targets: {getattr(e, 'stderr', None) or e}", file=sys.stderr, flush=True)
        if not args.loop:
            return
        time.sleep(1)


def cmd_config(args):
    jobs = []
    for mon in monitors(args.rendered):
        jobs.append({
            "job_name": f"{mon['kind'].lower()}/{mon['metadata']['namespace']}/{mon['metadata']['name']}",
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "file_sd_configs": [{"files": [os.path.join(args.dir, file_name(mon))], "refresh_interval": "1s"}],
        })
    with open(args.out, "w") as f:
        yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "scrape_configs": jobs}, f)


def api(prom, path, **params):
    url = f"{prom}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def regex_quote(text):
    """`text` as a literal in a PromQL regex (PromQL strings know no `\-`)."""
    return re.sub(r"([.+*?()\[\]{}|^$\\])", r"\\\\\1", text)


def substitute(expr, variables):
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


def cmd_check(args):
    at = str(args.time)
    variables = {
        "__rate_interval": "20s",
        "__interval": "5s",
        "namespace": regex_quote(args.namespace),
        "run": regex_quote(args.run),
    }
    failures, queries = [], 0
    for path in sorted(os.listdir(args.dashboards)):
        if not path.endswith(".json"):
            continue
        with open(os.path.join(args.dashboards, path)) as f:
            board = json.load(f)
        # The template variables' own queries find this run.
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
            if not m:
                failures.append(f"{path}: variable {var['name']}: cannot read {var['definition']!r}")
                continue
            match, label = substitute(m.group(1), variables), m.group(2)
            values = api(args.prom, f"/api/v1/label/{label}/values", **{"match[]": match},
                         start=str(args.time - 60), end=at)
            want = {"namespace": args.namespace, "run": args.run}.get(label)
            if want not in values:
                failures.append(f"{path}: variable {var['name']} ({var['definition']}) offers {values}, not {want}")
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                expr = substitute(t["expr"], variables)
                queries += 1
                try:
                    result = api(args.prom, "/api/v1/query", query=expr, time=at)["result"]
                except Exception as e:  # an invalid query is a failure too
                    failures.append(f"{path}: {panel['title']!r}: {expr}: {e}")
                    continue
                if not result:
                    failures.append(f"{path}: {panel['title']!r} returned no data: {expr}")
    # Every series a run's pods export can be told apart by run and namespace.
    unlabelled = api(args.prom, "/api/v1/query",
                     query='count by (job, __name__) ({job=~"podmonitor/.*", __name__=~"pipewright_.+"} '
                           'unless {run!="", namespace!=""})', time=at)["result"]
    for r in unlabelled:
        failures.append(f"series {r['metric'].get('__name__')} of {r['metric'].get('job')} lacks a run or namespace label")
    shards = api(args.prom, "/api/v1/query",
                 query=f'count by (role) (up{{namespace="{args.namespace}", run="{args.run}"}} == 1)', time=at)["result"]
    roles = {r["metric"].get("role"): int(r["value"][1]) for r in shards}
    if roles.get("coordinator") != 1 or roles.get("shard") != args.shards:
        failures.append(f"targets up for {args.run}: {roles}; want 1 coordinator and {args.shards} shards")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"{queries} panel queries in {len(os.listdir(args.dashboards))} dashboards returned data; "
          f"targets up: {roles}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("targets")
    t.add_argument("--rendered", required=True, help="helm template output with the monitors")
    t.add_argument("--dir", required=True, help="where the target files go")
    t.add_argument("--addresses", required=True, help="pod address lines, from e2e/kubelet.py")
    t.add_argument("--serve", action="append", default=[], help="NAMESPACE/SERVICE=HOST:PORT")
    t.add_argument("--loop", action="store_true")
    c = sub.add_parser("config")
    c.add_argument("--rendered", required=True)
    c.add_argument("--dir", required=True)
    c.add_argument("--out", required=True)
    k = sub.add_parser("check")
    k.add_argument("--prom", required=True, help="http://HOST:PORT")
    k.add_argument("--dashboards", required=True)
    k.add_argument("--namespace", required=True)
    k.add_argument("--run", required=True)
    k.add_argument("--shards", type=int, required=True)
    k.add_argument("--time", type=float, required=True, help="unix seconds to evaluate at")
    args = ap.parse_args()
    if args.cmd == "targets":
        return cmd_targets(args)
    if args.cmd == "config":
        return cmd_config(args)
    return cmd_check(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
