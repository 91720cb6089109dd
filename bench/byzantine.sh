#!/usr/bin/env bash
# The Byzantine attack suite: how often, and how fast, the run's checks
# (audits by recomputation of micro-batches and of gradient contributions,
# the chain of micro-batch hashes, parameter digests, signatures) catch each
# attack drill, what they cost, and what the
# attacks do to the loss.
#
# Trains bench/manifests/byzantine.yaml (2 stages × 3 replicas, one process
# per shard, `--threads 1`, 40 steps, median aggregation with lanes, audits
# at the default spec.validation.auditRate and contributionAuditRate, and a
# contribution audit of each replica a peer suspects) under every attack of
# `--byzantine` over SEEDS runs each: seed k sets spec.training.seed to k,
# the attacked shard to stage k mod 2, replica k mod 3 (the colluding pair:
# stage 0 and stage 1 of replica k mod 3, one lane; the lying pair: replicas
# k mod 3 and k + 1 mod 3 of stage k mod 2) and the first attacked
# step to 3 + (k mod 8). Then CLEAN clean runs: half through the launcher,
# half started by hand (`pipewright coordinator` and one `pipewright
# worker` per shard) with one worker on 2 kernel threads, since the
# launcher gives every worker the same count; and SEEDS clean runs with
# auditRate and contributionAuditRate 0 for the audits' cost. The pipeline
# attacks run a second time on bench/manifests/byzantine-single.yaml (2
# stages × 1 replica, the coordinator as validator; the attacker at stage
# k mod 2), beside SEEDS clean runs of it. Each run's
# verdicts come from its run directory: the ledger's quarantined identities
# (`pipewright ledger --json`), its refusals and sessions (ledger.sqlite),
# and summary.json.
# An attack this build does not know is reported as such, not run.
# Writes bench/results/byzantine.md.
#
# Usage: bench/byzantine.sh [--seeds N] [--clean N] [--quick] [--out FILE]
#   --seeds N   runs per attack, without audits and with one replica (default 10)
#   --clean N   clean runs with audits (default 20)
#   --quick     2 seeds, 2 clean runs, 20 steps: checks the harness
#   --only LIST only these attacks, comma-separated names as the report
#               prints them (e.g. "grad-nan,lazy-zeros (1 replica)"); the
#               clean runs are made all the same
# Environment: PIPEWRIGHT_BIN (a prebuilt binary; skips the build),
# PIPEWRIGHT_BIN_COMMIT (the commit it was built from, for the report),
# BENCH_RECORDS (a file to keep every run's record in, one JSON line each).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seeds=10
clean=20
steps=""
out="bench/results/byzantine.md"
only=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --clean) clean="$2"; shift 2 ;;
        --quick) seeds=2; clean=2; steps=20; shift ;;
        --out) out="$2"; shift 2 ;;
        --only) only=",$2,"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ $seeds -ge 1 && $clean -ge 2 ]] || { echo "--seeds must be 1 or more, --clean 2 or more" >&2; exit 2; }
# shellcheck source=bench/lib.sh
source bench/lib.sh
prepare
commit="${PIPEWRIGHT_BIN_COMMIT:-$(git rev-parse --short HEAD)}"
manifest=bench/manifests/byzantine.yaml
results="$work/results.jsonl"
: >"$results"
per_run_limit=120

# name|spec[|single]: SR stands for the seed's shard "S/R", R for its
# replica, SQ for the next replica of the same stage "S/(R+1 mod 3)". `single` runs on bench/manifests/byzantine-single.yaml (2 stages
# × 1 replica: no replica to validate, the coordinator recomputes), where R
# is 0.
attacks=(
    "act-noise|SR=act-noise"
    "act-scale|SR=act-scale"
    "sign-flip|SR=sign-flip"
    "scale|SR=scale"
    "contribution-lie|SR=contribution-lie"
    "grad-nan|SR=grad-nan"
    "lazy-zeros|SR=lazy-zeros"
    "lazy-replay|SR=lazy-replay"
    "stale|SR=stale"
    "forge|SR=forge"
    "lie|SR=lie"
    "lie pair|SR=lie SQ=lie"
    "lie-received pair|SR=lie-received SQ=lie-received"
    "collude|0/R=act-noise 1/R=act-noise"
    "act-noise|SR=act-noise|single"
    "act-scale|SR=act-scale|single"
    "lazy-zeros|SR=lazy-zeros|single"
    "lazy-replay|SR=lazy-replay|single"
    "stale|SR=stale|single"
    "sign-flip|SR=sign-flip|single"
    "scale|SR=scale|single"
    "forge|SR=forge|single"
)
single_manifest=bench/manifests/byzantine-single.yaml

# known ATTACK: whether this binary parses `--byzantine 0/0=ATTACK`.
known() {
    local err
    err="$("$PIPEWRIGHT_BIN" train --processes --byzantine "0/0=$1" "$work/no-such-manifest.yaml" 2>&1 || true)"
    ! grep -q -- "--byzantine" <<<"$err"
}

# manifest_for SEED AUDIT_RATE [single]: the bench manifest (the one-replica
# one with `single`) with that seed (and that rate for both kinds of audits
# unless empty), as a file path.
manifest_for() {
    local base="$manifest" file="$work/m-$1-${2:-default}${3:+-$3}.yaml"
    [[ ${3:-} == single ]] && base="$single_manifest"
    sed "s/seed: 1,/seed: $1,/" "$base" >"$file"
    [[ -n $steps ]] && sed -i "s/steps: 40,/steps: $steps,/" "$file"
    if [[ -n $2 ]]; then
        if [[ ${3:-} == single ]]; then
            printf '  validation: {auditRate: %s}\n' "$2" >>"$file"
        else
            printf '  validation: {auditRate: %s, contributionAuditRate: %s}\n' "$2" "$2" >>"$file"
        fi
    fi
    echo "$file"
}

# record RUN_DIR KIND NAME SEED START RC MILLISECONDS SHARDS: one JSON line of
# what the run directory says, appended to $results; the directory is then
# removed (checkpoints add up).
record() {
    python3 - "$@" "$PIPEWRIGHT_BIN" >>"$results" <<'PY'
import json, os, re, sqlite3, subprocess, sys
run, kind, name, seed, start, rc, seconds, shards, exe = sys.argv[1:10]
row = {"kind": kind, "name": name, "seed": int(seed), "start": int(start), "rc": int(rc),
       "seconds": int(seconds) / 1e3,
       "shards": [[int(x) for x in s.split("/")] for s in shards.split()],
       "quarantined": [], "refusals": [], "losses": [], "audits": [0, 0]}
summary = os.path.join(run, "summary.json")
if os.path.exists(summary):
    s = json.load(open(summary))
    row["step_seconds"] = s.get("step_seconds_measured")
    row["final_loss"] = s.get("final_loss")
    row["summary"] = {k: v for k, v in s.items() if k not in ("losses", "final_loss")}
if os.path.exists(run + ".restarts"):
    row["restarts"] = open(run + ".restarts").read().splitlines()
if int(rc) != 0 and os.path.exists(run + ".err"):
    row["err_tail"] = open(run + ".err", errors="replace").read().splitlines()[-3:]
db = os.path.join(run, "ledger.sqlite")
if os.path.exists(db):
    out = subprocess.run([exe, "ledger", run, "--json"], capture_output=True, text=True)
    if out.returncode == 0:
        for q in json.loads(out.stdout).get("quarantined", []):
            c = q.get("conviction", q)
            row["quarantined"].append({"stage": c["stage"], "replica": c["replica"],
                                       "step": c["step"], "reason": c["reason"]})
    else:
        row["ledger_error"] = out.stderr.strip()[-300:]
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    shard_of = {w: (s, r) for w, s, r in con.execute("SELECT worker, stage, replica FROM sessions")}
    by_identity = {i: (s, r) for i, s, r in con.execute("SELECT identity, stage, replica FROM sessions")}
    if "refusals" in tables:
        for worker, identity, reason, detail in con.execute(
                "SELECT worker, identity, reason, detail FROM refusals ORDER BY id"):
            shard = shard_of.get(worker) or by_identity.get(identity)
            m = re.search(r"\bsteps? (\d+)", detail)
            row["refusals"].append({"shard": list(shard) if shard else None, "reason": reason,
                                    "step": int(m.group(1)) if m else None, "detail": detail[:200]})
    row["losses"] = [l for (l,) in con.execute("SELECT loss FROM steps ORDER BY step")]
    cols = {r[1] for r in con.execute("PRAGMA table_info(entries)")}
    if {"audits_passed", "audits_failed"} <= cols:
        p, f = con.execute("SELECT COALESCE(SUM(audits_passed), 0), COALESCE(SUM(audits_failed), 0) "
                           "FROM entries").fetchone()
        row["audits"] = [p, f]
if row.get("final_loss") is None and row["losses"]:
    row["final_loss"] = row["losses"][-1]
# The workers' suspicions of a peer's gradient contribution (robust rules):
# each honest peer logs the same one, kept once per step and shard.
import glob
seen = set()
for f in [run + ".err"] + sorted(glob.glob(run + ".w*.err")):
    if os.path.exists(f):
        for line in open(f, errors="replace"):
            m = re.search(r"step (\d+): suspect contribution from stage (\d+) replica (\d+) \((\w+)\)", line)
            if m:
                seen.add((int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)))
row["suspicions"] = [{"step": st, "stage": sg, "replica": rp, "why": why}
                     for st, sg, rp, why in sorted(seen)]
print(json.dumps(row))
PY
    rm -rf "$1"
}

# launched RUN_DIR MANIFEST ARGS...: a run through `train --processes`;
# prints its exit code and milliseconds.
launched() {
    local run="$1" man="$2" rc=0 t0
    shift 2
    t0=$(date +%s%N)
    timeout "$per_run_limit" "$PIPEWRIGHT_BIN" train --processes --quiet --threads 1 "$@" \
        --out "$run" "$man" >"$run.out" 2>"$run.err" || rc=$?
    echo "$rc $((($(date +%s%N) - t0) / 1000000))"
}

# shard_worker RUN_DIR MANIFEST URL TOKEN STAGE REPLICA THREADS COORDINATOR:
# runs the worker of shard (STAGE, REPLICA) until it ends with 0 or the
# coordinator process COORDINATOR is gone. As the launcher does, a worker
# that exits otherwise is started again, one that was quarantined (exit
# code 3) under a new identity; each restart is a line in RUN_DIR.restarts.
shard_worker() {
    local run="$1" man="$2" url="$3" token="$4" s="$5" r="$6" threads="$7" coordinator="$8"
    local n=0 rc
    while :; do
        rc=0
        PIPEWRIGHT_JOIN_TOKEN="$token" timeout "$per_run_limit" "$PIPEWRIGHT_BIN" worker "$man" \
            --coordinator "$url" --stage "$s" --replica "$r" --threads "$threads" \
            --identity "$run/identities/stage-$s-replica-$r-$n" >/dev/null 2>>"$run.w$s$r.err" || rc=$?
        ((rc == 0)) && return 0
        kill -0 "$coordinator" 2>/dev/null || return 0
        echo "$s/$r exit $rc: $(tail -1 "$run.w$s$r.err")" >>"$run.restarts"
        ((rc == 3)) && n=$((n + 1))
        sleep 0.5
    done
}

# by_hand RUN_DIR MANIFEST STAGE REPLICA: a run whose coordinator and six
# workers this script starts, worker (STAGE, REPLICA) on 2 kernel threads
# and the others on 1; prints the coordinator's exit code and milliseconds.
by_hand() {
    local run="$1" man="$2" odd="$3/$4" rc=0 t0 url="" token s r threads
    local pids=()
    mkdir -p "$run/identities"
    token="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    t0=$(date +%s%N)
    PIPEWRIGHT_JOIN_TOKEN="$token" timeout "$per_run_limit" "$PIPEWRIGHT_BIN" coordinator "$man" \
        --listen 127.0.0.1:0 --out "$run" 2>"$run.err" &
    local coordinator=$!
    for _ in $(seq 200); do
        url="$(grep -o 'listening on http://[0-9.:]*' "$run.err" | head -1 | cut -d' ' -f3 || true)"
        [[ -n $url ]] && break
        sleep 0.05
    done
    [[ -n $url ]] || { kill "$coordinator" 2>/dev/null; wait "$coordinator" || true; echo "99 $((($(date +%s%N) - t0) / 1000000))"; return; }
    for s in 0 1; do
        for r in 0 1 2; do
            threads=1
            [[ "$s/$r" == "$odd" ]] && threads=2
            shard_worker "$run" "$man" "$url" "$token" "$s" "$r" "$threads" "$coordinator" &
            pids+=($!)
        done
    done
    wait "$coordinator" || rc=$?
    for p in "${pids[@]}"; do wait "$p" || true; done
    echo "$rc $((($(date +%s%N) - t0) / 1000000))"
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
started=$(date +%s)
missing=()
for entry in "${attacks[@]}"; do
    IFS='|' read -r name spec layout <<<"$entry"
    [[ -n $layout ]] && name="$name (1 replica)"
    [[ -z $only || $only == *",$name,"* ]] || continue
    wanted=()
    for one in $spec; do wanted+=("${one#*=}"); done
    absent=""
    for a in "${wanted[@]}"; do known "$a" || absent="$a"; done
    if [[ -n $absent ]]; then
        echo "attack $name: this build has no '$absent' attack; skipped" >&2
        missing+=("$name")
        continue
    fi
    for k in $(seq 1 "$seeds"); do
        stage=$((k % 2)) replica=$((k % 3)) start=$((3 + k % 8))
        [[ -n $layout ]] && replica=0
        args=() shards=""
        for one in $spec; do
            shard="${one%%=*}" attack="${one#*=}"
            shard="${shard/SQ/$stage/$(((replica + 1) % 3))}"
            shard="${shard/SR/$stage/$replica}"
            shard="${shard/R/$replica}"
            args+=(--byzantine "$shard=$attack@$start")
            shards+="$shard "
        done
        run="$work/${name// /_}-$k"
        run="${run//[()]/}"
        read -r rc secs < <(launched "$run" "$(manifest_for "$k" "" "$layout")" "${args[@]}")
        record "$run" attack "$name" "$k" "$start" "$rc" "$secs" "$shards"
        echo "$name seed $k (${args[*]}): exit $rc, $((secs / 1000)) s" >&2
    done
done
# Clean runs, seed by seed: with audits through the launcher, with audits
# and one worker on 2 threads, and without audits; interleaved, so that a
# change of the machine's load falls on all three alike.
half=$(((clean + 1) / 2))
for k in $(seq 1 $((half > seeds ? half : seeds))); do
    if ((k <= half)); then
        run="$work/clean-$k"
        read -r rc secs < <(launched "$run" "$(manifest_for "$k" "")")
        record "$run" clean uniform "$k" 0 "$rc" "$secs" ""
        echo "clean run, seed $k: exit $rc, $((secs / 1000)) s" >&2
    fi
    if ((k <= clean / 2)); then
        run="$work/mixed-$k"
        read -r rc secs < <(by_hand "$run" "$(manifest_for "$k" "")" $((k % 2)) $((k % 3)))
        record "$run" clean mixed "$k" 0 "$rc" "$secs" "$((k % 2))/$((k % 3))"
        echo "clean run, seed $k, worker $((k % 2))/$((k % 3)) on 2 threads: exit $rc, $((secs / 1000)) s" >&2
    fi
    if ((k <= seeds)); then
        run="$work/single-$k"
        read -r rc secs < <(launched "$run" "$(manifest_for "$k" "" single)")
        record "$run" clean single "$k" 0 "$rc" "$secs" ""
        echo "clean run with one replica per stage, seed $k: exit $rc, $((secs / 1000)) s" >&2
    fi
    if ((k <= seeds)); then
        run="$work/noaudit-$k"
        read -r rc secs < <(launched "$run" "$(manifest_for "$k" 0)")
        record "$run" noaudit uniform "$k" 0 "$rc" "$secs" ""
        echo "clean run without audits, seed $k: exit $rc, $((secs / 1000)) s" >&2
    fi
    if ((k <= seeds)); then
        run="$work/noaudit-single-$k"
        read -r rc secs < <(launched "$run" "$(manifest_for "$k" 0 single)")
        record "$run" noaudit single "$k" 0 "$rc" "$secs" ""
        echo "clean run with one replica per stage without audits, seed $k: exit $rc, $((secs / 1000)) s" >&2
    fi
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
elapsed=$(($(date +%s) - started))
[[ -n ${BENCH_RECORDS:-} ]] && cp "$results" "$BENCH_RECORDS"
python3 - "$results" "$(machine)" "$commit" "$load_before" "$load_after" "$elapsed" \
    "${steps:-40}" "${missing[*]:-}" "$per_run_limit" >"$out" <<'PY'
import json, statistics, sys
path, machine, commit, before, after, elapsed, steps, missing, LIMIT = sys.argv[1:10]
rows = [json.loads(l) for l in open(path)]
order = []
for r in rows:
    if r["kind"] == "attack" and r["name"] not in order:
        order.append(r["name"])
def clean_of(r):
    """The clean run to compare an attack run with: same seed, same layout."""
    single = r["name"].endswith("(1 replica)")
    return clean.get(("clean", "single" if single else "uniform", r["seed"]))
def med(xs):
    return statistics.median(xs) if xs else None
def fmt(x, spec="{:.0f}", none="–"):
    return none if x is None else spec.format(x)

def verdicts(r):
    """What names each shard of the run: (shard, step, how) per quarantine or refusal."""
    out = [((q["stage"], q["replica"]), q["step"], "quarantined: " + q["reason"]) for q in r["quarantined"]]
    out += [(tuple(f["shard"]) if f["shard"] else None, f["step"], "refused: " + f["reason"])
            for f in r["refusals"]]
    return out

clean = {(r["kind"], r["name"], r["seed"]): r for r in rows if r["kind"] in ("clean", "noaudit")}
print("# The Byzantine attack suite: detection, cost and damage")
print()
print(f"`bench/byzantine.sh`: `bench/manifests/byzantine.yaml`, 2 stages × 3 replicas of a 4-layer model")
print(f"(`dim: 128`), one process per shard (`--threads 1`), 4 micro-batches of 4 × 64 tokens per")
print(f"replica per step, {steps} steps, `aggregation: median` with `routing: lanes`, audits at the default")
print("`spec.validation.auditRate` (0.25) and `contributionAuditRate` (0.05), and a contribution audit of")
print("each replica a peer suspects. Seed k: `spec.training.seed` k, the attacker at stage")
print("k mod 2, replica k mod 3, attacking from step 3 + (k mod 8) on (`--byzantine S/R=ATTACK@STEP`);")
print("`collude` is `act-noise` on stage 0 and stage 1 of replica k mod 3 (one lane: the second")
print("attacker receives the first's output); `lie pair` is `lie` on replicas k mod 3 and k + 1 mod 3")
print("of stage k mod 2, two colluding validators that tell the same lie (`lie-received pair`: the same")
print("lie about what the third replica sent them in the gather, which only its signed frames prove). An attack marked \"(1 replica)\" runs on")
print("`bench/manifests/byzantine-single.yaml`: the same model and steps on 2 stages × 1 replica under")
print("`mean`, the attacker at stage k mod 2 (no replica to validate it: the coordinator recomputes")
print("each audited micro-batch from the worker's uploaded parameters).")
print()
print("Detected: the ledger quarantined an attacker's identity, or refused a report naming an")
print("attacker's worker (a bad signature, an overturned verdict for `lie`, an outvoted parameters'")
print("digest, a failed micro-batch or contribution audit). Steps to detection: attacked steps up")
print("to the detecting one, 1 = the first attacked step. Honest convicted: an honest shard")
print("quarantined or refused in an attack run. Loss: the run's last loss minus the clean run's of")
print("the same seed (the launcher's clean run with audits), median over the seeds whose runs")
print("ended.")
print()
print(f"Runs not ended: exited with an error, or stopped after {LIMIT} s.")
print()
print("| attack | runs | detected | median steps | worst steps | how (runs) | honest convicted | runs not ended | Δ loss vs clean |")
print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
undetected = []
for name in order:
    rs = [r for r in rows if r["kind"] == "attack" and r["name"] == name]
    if not rs:
        continue
    det, how, honest, deltas = [], {}, 0, []
    for r in rs:
        attackers = {tuple(s) for s in r["shards"]}
        named = verdicts(r)
        hits = [(step, h) for shard, step, h in named if shard in attackers]
        if any(shard not in attackers for shard, _, _ in named):
            honest += 1
        if hits:
            first = [s for s, _ in hits if s is not None]
            det.append(min(first) - r["start"] + 1 if first else None)
            for h in sorted({h for _, h in hits}):
                how[h] = how.get(h, 0) + 1
        c = clean_of(r)
        if r["rc"] == 0 and c and c.get("final_loss") is not None and r.get("final_loss") is not None:
            deltas.append(r["final_loss"] - c["final_loss"])
    steps_known = [d for d in det if d is not None]
    failed = sum(1 for r in rs if r["rc"] != 0)
    missed = [r for r in rs if not any(shard in {tuple(x) for x in r["shards"]}
                                       for shard, _, _ in verdicts(r))]
    if missed:
        undetected.append((name, missed, len(rs), med(deltas)))
    print(f"| {name} | {len(rs)} | {len(det)}/{len(rs)} ({100 * len(det) / len(rs):.0f}%) | "
          f"{fmt(med(steps_known), '{:g}')} | {fmt(max(steps_known) if steps_known else None)} | "
          f"{'; '.join(f'{h} ({n})' for h, n in sorted(how.items())) or '–'} | {honest} | {failed} | "
          f"{fmt(med(deltas), '{:+.3f}')} |")
if missing.strip():
    print()
    print(f"Not run, unknown to this build: {', '.join(missing.split())}.")
print()
cl = [r for r in rows if r["kind"] == "clean"]
fp = [r for r in cl if r["quarantined"] or r["refusals"] or r["audits"][1] > 0]
audits = sum(r["audits"][0] + r["audits"][1] for r in cl)
print(f"## Clean runs")
print()
uni = [r for r in cl if r["name"] == "uniform"]
mix = [r for r in cl if r["name"] == "mixed"]
sin = [r for r in cl if r["name"] == "single"]
print(f"{len(cl)} clean runs with audits: {len(uni)} through the launcher (every worker on 1 kernel")
print(f"thread), {len(mix)} started by hand with one worker (stage seed mod 2, replica seed mod 3) on 2")
print(f"threads, {len(sin)} with one replica per stage. False positives (a quarantine, a refusal or a failed audit): {len(fp)} of {len(cl)} runs;")
print(f"{sum(r['audits'][1] for r in cl)} failed of {audits} audits booked in all.")
for r in fp:
    why = [q["reason"] for q in r["quarantined"]] + [f["reason"] for f in r["refusals"]]
    print(f"- seed {r['seed']} ({r['name']}): {', '.join(why) or 'failed audits'}; "
          f"{r['refusals'][0]['detail'] if r['refusals'] else ''}")
same = []
for r in mix:
    u = clean.get(("clean", "uniform", r["seed"]))
    if u and u["losses"] and r["losses"]:
        same.append(u["losses"] == r["losses"])
if same:
    print(f"Losses of every step bit for bit equal to the launcher's run of the same seed: "
          f"{sum(same)} of {len(same)} runs with a worker on 2 threads.")
restarted = [r for r in cl if r.get("restarts")]
if restarted:
    print(f"Clean runs in which a worker process exited and was started again: {len(restarted)} of {len(cl)};")
    print("first exit of each: " + "; ".join(f"seed {r['seed']} ({r['name']}): {r['restarts'][0]}"
                                           for r in restarted) + ".")
not_ended = [r for r in cl if r["rc"] != 0]
if not_ended:
    ended = ", ".join("seed %d (%s, exit %d)" % (r["seed"], r["name"], r["rc"]) for r in not_ended)
    print(f"Clean runs that did not end well: {ended}.")
print()
print("## Cost of the audits")
print()
def wall(r):
    """The run's training wall time per step: the audits' waits at the
    step barrier count, which a worker's own step time leaves out."""
    s = r.get("summary") or {}
    return s["seconds"] / s["steps"] if s.get("seconds") and s.get("steps") else None

print("Wall time per step: each run's training wall time over its steps (from the launcher's")
print("summary), so the time every worker waits at the step barrier while the step's audits are")
print("decided counts; the runs of a seed follow each other.")
print()
def cost(label, audited, plain):
    by_seed = {r["seed"]: wall(r) for r in plain if wall(r)}
    pairs = [(wall(r), by_seed[r["seed"]]) for r in audited if wall(r) and r["seed"] in by_seed]
    if not pairs:
        return
    a, b = med([x for x, _ in pairs]), med([y for _, y in pairs])
    ratios = [x / y - 1 for x, y in pairs]
    print(f"{label}: {a * 1e3:.1f} ms with audits, {b * 1e3:.1f} ms with `auditRate: 0` and "
          f"`contributionAuditRate: 0` ({len(pairs)} seeds): {100 * (a - b) / b:+.1f}% for the audits; "
          f"seed by seed median {100 * med(ratios):+.1f}%, from {100 * min(ratios):+.1f}% to "
          f"{100 * max(ratios):+.1f}%.")
    print()
na = [r for r in rows if r["kind"] == "noaudit" and r["name"] == "uniform"]
ns = [r for r in rows if r["kind"] == "noaudit" and r["name"] == "single"]
cost("2 stages × 3 replicas (`bench/manifests/byzantine.yaml`, replicas validate)", uni, na)
cost("2 stages × 1 replica (`bench/manifests/byzantine-single.yaml`, the coordinator validates: "
     "the audited micro-batch, the whole step's gradients and the update)", sin, ns)
pairs = [(clean.get(("clean", r["name"], r["seed"])), r) for r in na + ns]
eq = [u["losses"] == r["losses"] for u, r in pairs if u and u["losses"] and r["losses"]]
if eq:
    print(f"Losses with and without audits bit for bit equal: {sum(eq)} of {len(eq)} seeds (an audit")
    print("changes nothing of the validator's state).")
print()
# What each drill changes, for the attacks the checks cannot see by design.
NOTES = {
    "sign-flip": "The drill changes only the gradient contribution it hands to the aggregation, "
                 "which the median cuts off; the parameters' digests agree since every replica applies "
                 "the same median, and micro-batch audits do not recompute contributions. Only a "
                 "contribution audit convicts it: drawn at contributionAuditRate, or ordered when a peer "
                 "suspects the contribution.",
    "scale": "As `sign-flip`: a gradient contribution ×100, cut off by the median, convicted only by "
             "a contribution audit.",
    "contribution-lie": "As `sign-flip`, but it signs the honest contribution's hash: a contribution "
                        "audit convicts it on what its neighbours received.",
    "lazy-zeros": "From stage 0 the zeros make the gradient contribution of the stage-1 replica that "
                  "receives them absurd (RMSNorm of a zero vector): that stage's gradient ring refuses "
                  "it (`absurd_norm`, counted on the link, not in the ledger) and the step breaks off "
                  "before its barrier, where audits are drawn. A drill attacks a step number once, so "
                  "the replay is honest: the damage is the time, an epoch per attacked step, and the "
                  "honest receiver takes the blame on the link.",
}
clean_seconds = med([r["seconds"] for r in uni]) or 0.0
print("## Mitigated or not caught")
print()
if undetected:
    for name, missed, total, delta in undetected:
        where = {}
        for r in missed:
            key = "stage " + " and ".join(str(s[0]) for s in r["shards"])
            where[key] = where.get(key, 0) + 1
        slow = [r for r in missed if r["rc"] != 0]
        took = med([r["seconds"] for r in missed])
        print(f"- `{name}`: undetected in {len(missed)} of {total} runs (attacker on "
              + ", ".join(f"{k}: {n}" for k, n in sorted(where.items()))
              + f"); median Δ loss vs clean {fmt(delta, '{:+.3f}')}; these runs took {took:.0f} s "
              + f"(median; a clean run {clean_seconds:.0f} s)"
              + (f"; {len(slow)} of them did not end within the limit" if slow else "") + ". "
              + NOTES.get(name, ""))
else:
    print("Every attack run was detected.")
print()
# Suspicion of gradient contributions: every replica measures each peer's
# contribution in the gather (cosine with the aggregate, norm against the
# median norm) and logs the suspect ones; a suspicion convicts no one.
print("## Suspected gradient contributions")
print()
print("Runs whose worker logs name the attacker's contribution as suspect (cosine < 0 or norm ratio")
print("beyond 30×, `docs/byzantine.md`), steps from the first attacked one to the first suspicion")
print("(1 = at once), and shards wrongly suspected in clean runs. A suspicion convicts no one.")
print()
print("| attack | runs | attacker suspected | median steps | honest shards suspected |")
print("| --- | --- | --- | --- | --- |")
for name in ["sign-flip", "scale", "contribution-lie"]:
    rs = [r for r in rows if r["kind"] == "attack" and r["name"] == name]
    if not rs:
        continue
    hit, delays, wrong = 0, [], 0
    for r in rs:
        bad = {tuple(x) for x in r["shards"]}
        on = [x for x in r.get("suspicions", []) if (x["stage"], x["replica"]) in bad]
        wrong += len({(x["stage"], x["replica"]) for x in r.get("suspicions", [])} - bad)
        if on:
            hit += 1
            delays.append(min(x["step"] for x in on) - r["start"] + 1)
    print(f"| {name} | {len(rs)} | {hit} | {fmt(med(delays), '{:.0f}')} | {wrong} |")
cl = [r for r in rows if r["kind"] in ("clean", "noaudit")]
fp = sum(len(r.get("suspicions", [])) for r in cl)
print(f"| (clean runs) | {len(cl)} | | | {fp} suspicions |")
print()
print(machine)
print(f"Commit {commit}. Load average (1, 5, 15 min): {before} before, {after} after; "
      f"{int(elapsed) // 60} min {int(elapsed) % 60} s in all.")
PY
cat "$out"
