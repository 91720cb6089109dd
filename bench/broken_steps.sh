#!/usr/bin/env bash
# Attacks that break a step off before its barrier (`nan`, `lazy-zeros`):
# how often, and how fast, the signed frames' complaints and the rechecks of
# broken steps convict the attacker, whether anyone honest is convicted or
# refused, and how long the runs take.
#
# bench/manifests/byzantine.yaml (2 stages × 3 replicas, `median`, 40 steps,
# audits at the default rate), as bench/byzantine.sh runs it: seed k sets
# spec.training.seed to k, the attacked shard to stage k mod 2, replica
# k mod 3, and the first attacked step to 3 + (k mod 8). `lazy-zeros` runs
# also with audits off (`auditRate: 0`), where only a recheck can convict.
# Writes bench/results/broken-steps.md.
#
# Usage: bench/broken_steps.sh [--seeds N] [--out FILE]
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seeds=10
out="bench/results/broken-steps.md"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $seeds -ge 1 ]] || { echo "--seeds must be 1 or more" >&2; exit 2; }
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
commit="$(git rev-parse --short HEAD)"
results="$work/results.jsonl"
: >"$results"
started=$(date +%s)

for variant in "nan|" "lazy-zeros|" "lazy-zeros|0"; do
    attack="${variant%%|*}"
    rate="${variant##*|}"
    for ((k = 1; k <= seeds; k++)); do
        m="$work/m-$k-${rate:-default}.yaml"
        sed "s/seed: 1,/seed: $k,/" bench/manifests/byzantine.yaml >"$m"
        [[ -n $rate ]] && printf '  validation: {auditRate: %s}\n' "$rate" >>"$m"
        shard="$((k % 2))/$((k % 3))"
        start=$((3 + k % 8))
        run="$work/run-$attack-${rate:-default}-$k"
        t0=$(date +%s%3N)
        rc=0
        timeout 120 "$PIPEWRIGHT_BIN" train --processes --quiet --out "$run" \
            --byzantine "$shard=$attack@$start" "$m" >/dev/null 2>"$run.err" || rc=$?
        t1=$(date +%s%3N)
        python3 - "$run" "$attack" "${rate:-default}" "$k" "$shard" "$start" "$rc" "$((t1 - t0))" >>"$results" <<'PY'
import json, os, sqlite3, sys
run, attack, rate, seed, shard, start, rc, ms = sys.argv[1:9]
s, r = (int(x) for x in shard.split("/"))
row = {"attack": attack, "rate": rate, "seed": int(seed), "shard": [s, r], "start": int(start),
       "rc": int(rc), "seconds": int(ms) / 1e3, "quarantined": [], "refusals": []}
db = os.path.join(run, "ledger.sqlite")
if os.path.exists(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "quarantine" in tables:
        cols = [c[1] for c in con.execute("PRAGMA table_info(quarantine)")]
        for q in con.execute("SELECT * FROM quarantine"):
            q = dict(zip(cols, q))
            row["quarantined"].append({"stage": q.get("stage"), "replica": q.get("replica"),
                                       "step": q.get("step"), "reason": q.get("reason")})
    if "refusals" in tables:
        shard_of = {w: (a, b) for w, a, b in con.execute("SELECT worker, stage, replica FROM sessions")}
        for worker, reason in con.execute("SELECT worker, reason FROM refusals ORDER BY id"):
            row["refusals"].append({"shard": shard_of.get(worker), "reason": reason})
print(json.dumps(row))
PY
        rm -rf "$run" "$run.err"
        echo "$attack (audits ${rate:-default}) seed $k: rc $rc, $(((t1 - t0) / 1000)) s" >&2
    done
done

python3 - "$results" "$out" "$commit" "$(machine)" "$(($(date +%s) - started))" <<'PY'
import json, statistics, sys
results, out, commit, machine, total = sys.argv[1:6]
rows = [json.loads(l) for l in open(results)]
lines = ["# Attacks that break a step off: complaints and rechecks", "",
         "`bench/broken_steps.sh`: `bench/manifests/byzantine.yaml`, 2 stages × 3 replicas "
         "(`median`, 40 steps). Seed k: `spec.training.seed` k, the attacker at stage k mod 2, "
         "replica k mod 3, attacking from step 3 + (k mod 8) on. Audits at the default rate "
         "(0.25), or off (`auditRate: 0`: only a complaint or a recheck can convict).", "",
         "Detected: the attacker's identity quarantined. Steps to detection: attacked steps up "
         "to the convicting one, 1 = the first attacked step. Honest convicted: another shard "
         "quarantined. Honest refused: a refusal recorded against a shard that is not the "
         "attacker's. Runs not ended: exited with an error or stopped after 120 s.", "",
         "| attack | audits | runs | detected | on stage 0 | on stage 1 | median steps | worst steps | "
         "how (runs) | honest convicted | honest refused | runs not ended | median seconds |",
         "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
groups = {}
for r in rows:
    groups.setdefault((r["attack"], r["rate"]), []).append(r)
for (attack, rate), rs in groups.items():
    det, steps, how, honest_q, honest_r, not_ended = 0, [], {}, 0, 0, 0
    by_stage = {0: [0, 0], 1: [0, 0]}
    for r in rs:
        mine = [q for q in r["quarantined"] if [q["stage"], q["replica"]] == r["shard"]]
        others = [q for q in r["quarantined"] if [q["stage"], q["replica"]] != r["shard"]]
        honest_q += len(others)
        honest_r += sum(1 for f in r["refusals"]
                        if f["shard"] is not None and list(f["shard"]) != r["shard"])
        if r["rc"] != 0:
            not_ended += 1
        by_stage[r["shard"][0]][1] += 1
        if mine:
            by_stage[r["shard"][0]][0] += 1
            det += 1
            first = min(mine, key=lambda q: q["step"])
            steps.append(first["step"] - r["start"] + 1)
            how[first["reason"]] = how.get(first["reason"], 0) + 1
    n = len(rs)
    med = f"{statistics.median(steps):g}" if steps else "–"
    worst = str(max(steps)) if steps else "–"
    hows = "; ".join(f"{k} ({v})" for k, v in sorted(how.items())) or "–"
    secs = statistics.median(r["seconds"] for r in rs)
    audits = "off" if rate == "0" else "0.25"
    st = [f"{by_stage[g][0]}/{by_stage[g][1]}" for g in (0, 1)]
    lines.append(f"| {attack} | {audits} | {n} | {det}/{n} ({100 * det // n}%) | {st[0]} | {st[1]} | "
                 f"{med} | {worst} | "
                 f"{hows} | {honest_q} | {honest_r} | {not_ended} | {secs:.1f} |")
lines += ["", f"{machine}", f"Commit {commit}; {int(total) // 60} min {int(total) % 60} s in all.", ""]
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
PY
