#!/usr/bin/env python3
"""Checks a run's traces through Jaeger's query API.

    traces.py --query http://127.0.0.1:16686 --run NAME --stages 2 --replicas 2 [--operator]

Passes when Jaeger holds, for run NAME, a trace of one training step whose
root is the coordinator's `step N` span and which holds `forward`,
`backward`, `all-reduce` and `barrier` spans of every shard (stage, replica),
each below that root; with --operator, also the operator's `reconcile` spans
of the run. Prints what it found; on failure prints `FAIL:` naming what is
missing and exits 1. Standard library only.
"""

import argparse
import json
import re
import sys
import time
import urllib.parse
import urllib.request

KINDS = ("forward", "backward", "all-reduce", "barrier")
COORDINATOR = "pipewright-coordinator"
WORKER = "pipewright-worker"
OPERATOR = "pipewright-operator"


def get(query, path, **params):
    url = f"{query}{path}?{urllib.parse.urlencode(params)}" if params else f"{query}{path}"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r).get("data") or []


def tags(span):
    return {t["key"]: t["value"] for t in span.get("tags") or []}


def parent(span):
    for ref in span.get("references") or []:
        if ref.get("refType") == "CHILD_OF":
            return ref["spanID"]
    return None


def coverage(trace, run, shards):
    """(step, root span, {kind: set of (stage, replica) below the root},
    shard step spans) of a step trace of `run`, or None."""
    service = {pid: p["serviceName"] for pid, p in trace["processes"].items()}
    spans = {s["spanID"]: s for s in trace["spans"]}
    roots = [
        s
        for s in trace["spans"]
        if service[s["processID"]] == COORDINATOR
        and re.fullmatch(r"step \d+", s["operationName"])
        and parent(s) is None
        and str(tags(s).get("run")) == run
    ]
    if not roots:
        return None
    root = roots[0]

    def below_root(s):
        seen = set()
        while s is not None and s["spanID"] not in seen:
            seen.add(s["spanID"])
            p = parent(s)
            if p == root["spanID"]:
                return True
            s = spans.get(p)
        return False

    found = {k: set() for k in KINDS + ("shard step",)}
    for s in trace["spans"]:
        if service[s["processID"]] != WORKER or s["operationName"] not in found:
            continue
        t = tags(s)
        if "stage" not in t or "replica" not in t or not below_root(s):
            continue
        found[s["operationName"]].add((int(t["stage"]), int(t["replica"])))
    step = int(root["operationName"].split()[1])
    return step, root, found


def check(args):
    shards = {(s, r) for s in range(args.stages) for r in range(args.replicas)}
    problems = []
    services = set(get(args.query, "/api/services"))
    wanted = [COORDINATOR, WORKER] + ([OPERATOR] if args.operator else [])
    missing = [s for s in wanted if s not in services]
    if missing:
        return [f"Jaeger knows no service {', '.join(missing)} (it has: {sorted(services)})"], None
    traces = get(args.query, "/api/traces", service=COORDINATOR, limit=args.limit, lookback="2h")
    steps = []
    for trace in traces:
        c = coverage(trace, args.run, shards)
        if c:
            steps.append(c)
    if not steps:
        return [f"no `step N` trace of run {args.run} from {COORDINATOR} ({len(traces)} traces)"], None
    steps.sort(key=lambda c: c[0])
    complete = [c for c in steps if all(c[2][k] >= shards for k in KINDS)]
    summary = f"{len(complete)} of {len(steps)} step traces of {args.run} cover all {len(shards)} shards"
    if not complete:
        # Name what the most complete step lacks.
        best = max(steps, key=lambda c: sum(len(c[2][k] & shards) for k in KINDS))
        step, _, found = best
        for kind in KINDS:
            lacking = sorted(shards - found[kind])
            if lacking:
                shown = ", ".join(f"stage {s} replica {r}" for s, r in lacking)
                problems.append(f"step {step}: no `{kind}` span under `step {step}` from {shown}")
        return problems, summary
    step, root, found = complete[len(complete) // 2]
    trace = next(t for t in traces if t["traceID"] == root["traceID"])
    ops = {}
    for s in trace["spans"]:
        ops[s["operationName"]] = ops.get(s["operationName"], 0) + 1
    print(f"step {step} (trace {root['traceID']}): {len(trace['spans'])} spans: "
          + ", ".join(f"{n}×{k}" for k, n in sorted(ops.items())))
    if args.operator:
        reconciles = get(args.query, "/api/traces", service=OPERATOR, operation="reconcile",
                         limit=args.limit, lookback="2h")
        mine = [
            s
            for t in reconciles
            for s in t["spans"]
            if s["operationName"] == "reconcile" and str(tags(s).get("run")) == args.run
        ]
        if not mine:
            problems.append(f"no `reconcile` span of run {args.run} from {OPERATOR} "
                            f"({len(reconciles)} reconcile traces in all)")
        else:
            summary += f"; {len(mine)} operator reconcile spans of the run"
    return problems, summary


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--query", required=True, help="Jaeger query base URL")
    p.add_argument("--run", required=True)
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--replicas", type=int, required=True)
    p.add_argument("--operator", action="store_true", help="also require the operator's spans")
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--wait", type=float, default=20.0,
                   help="seconds to keep asking while spans may still be arriving")
    args = p.parse_args()
    deadline = time.monotonic() + args.wait
    while True:
        try:
            problems, summary = check(args)
        except OSError as e:
            problems, summary = [f"Jaeger's query API at {args.query}: {e}"], None
        if not problems:
            print(summary)
            return 0
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    if summary:
        print(summary)
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
