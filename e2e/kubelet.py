#!/usr/bin/env python3
"""Plays the kubelet for the pods of one TrainingRun with local processes.

kwok marks pods Running without running anything. This runs, for every pod
of the run that kwok marks Running, the pod's container on this machine:
exactly the pod spec's args and env (secretKeyRef values read from their
Secret), with these local stand-ins for what a node would provide:

  - each pod gets its own loopback address, 127.0.0.X; `0.0.0.0:` in args
    and env becomes `127.0.0.X:`;
  - cluster DNS names (a pod's `<hostname>.<subdomain>.<ns>.svc`, a
    Service's `<name>.<ns>.svc`) in args and env become the address of the
    pod they name; the same names go into --hosts FILE (rewritten in place),
    so a process that resolves names through a bind-mounted /etc/hosts (the
    operator) reaches the pods too;
  - ConfigMap volumes become directories holding the ConfigMap's keys,
    emptyDir volumes empty directories, and args under a mount path point
    into them;
  - a process that exits sets its pod's phase the way a kubelet would
    (restartPolicy Never: Succeeded or Failed; OnFailure: restarted on
    failure, Succeeded on success);
  - a pod deleted, or no longer Running, has its process stopped.

Writes DIR/addresses ("pod address" lines) as pods start. Runs until
SIGTERM or SIGINT, then stops every process it started.
"""

import argparse
import base64
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def die_with_parent():
    """Child processes die when this process does, even on SIGKILL."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Kubectl:
    def __init__(self, namespace):
        self.namespace = namespace

    def json(self, *args):
        out = subprocess.run(
            ["kubectl", "-n", self.namespace, *args, "-o", "json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out)

    def set_phase(self, pod, phase, exit_code):
        reason = "Completed" if exit_code == 0 else "Error"
        status = {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": pod["spec"]["containers"][0]["name"],
                    "image": pod["spec"]["containers"][0].get("image", ""),
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {"terminated": {"exitCode": exit_code, "reason": reason}},
                }
            ],
        }
        subprocess.run(
            [
                "kubectl", "-n", self.namespace, "patch", "pod", pod["metadata"]["name"],
                "--subresource", "status", "--type", "merge",
                "-p", json.dumps({"status": status}),
            ],
            check=False,
            capture_output=True,
        )


class Kubelet:
    def __init__(self, args):
        self.args = args
        self.kubectl = Kubectl(args.namespace)
        self.namespace = args.namespace
        self.work = args.dir
        self.addresses = {}  # pod name -> 127.0.0.X
        self.procs = {}  # pod uid -> (Popen, pod, log file, restarts)
        self.done = set()  # pod uids whose container finished for good
        self.next_host = 10
        self.base_hosts = open("/etc/hosts").read() if os.path.exists("/etc/hosts") else ""
        self.written_hosts = None

    # --- names ------------------------------------------------------------
    def address_of(self, pod_name):
        if pod_name not in self.addresses:
            if self.next_host > 254:
                sys.exit("kubelet.py: out of loopback addresses")
            self.addresses[pod_name] = f"127.0.0.{self.next_host}"
            self.next_host += 1
            with open(os.path.join(self.work, "addresses"), "a") as f:
                f.write(f"{pod_name} {self.addresses[pod_name]}\n")
        return self.addresses[pod_name]

    def names(self, pods, services):
        """Cluster DNS name -> loopback address, for every pod with one."""
        ns = self.namespace
        table = {}
        for pod in pods:
            name = pod["metadata"]["name"]
            if name not in self.addresses:
                continue
            spec = pod["spec"]
            if spec.get("hostname") and spec.get("subdomain"):
                table[f"{spec['hostname']}.{spec['subdomain']}.{ns}.svc"] = self.addresses[name]
        for svc in services:
            selector = svc["spec"].get("selector") or {}
            if not selector or svc["spec"].get("clusterIP") == "None":
                continue
            for pod in pods:
                labels = pod["metadata"].get("labels") or {}
                name = pod["metadata"]["name"]
                if name in self.addresses and all(labels.get(k) == v for k, v in selector.items()):
                    table[f"{svc['metadata']['name']}.{ns}.svc"] = self.addresses[name]
                    break
        return table

    def write_hosts(self, table):
        if not self.args.hosts:
            return
        text = self.base_hosts.rstrip("\n") + "\n"
        for name in sorted(table):
            text += f"{table[name]} {name} {name}.cluster.local\n"
        if text == self.written_hosts:
            return
        # In place: the file may be bind-mounted, and a rename would detach it.
        with open(self.args.hosts, "r+" if os.path.exists(self.args.hosts) else "w") as f:
            f.seek(0)
            f.write(text)
            f.truncate()
        self.written_hosts = text

    # --- pods -------------------------------------------------------------
    def secret_value(self, ref):
        secret = self.kubectl.json("get", "secret", ref["name"])
        data = secret.get("data") or {}
        if ref["key"] not in data:
            raise ValueError(f"secret {ref['name']} has no key {ref['key']}")
        return base64.b64decode(data[ref["key"]]).decode()

    def command(self, pod, table):
        """(argv, env, cwd) for the pod's container, or None when a name it
        uses cannot be resolved yet."""
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        container = spec["containers"][0]
        me = self.address_of(name)
        root = os.path.join(self.work, "pods", name)
        os.makedirs(root, exist_ok=True)

        # Volumes.
        local = {}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            path = os.path.join(root, "volumes", mount["name"])
            os.makedirs(path, exist_ok=True)
            if "configMap" in volume:
                cm = self.kubectl.json("get", "configmap", volume["configMap"]["name"])
                for key, value in (cm.get("data") or {}).items():
                    with open(os.path.join(path, key), "w") as f:
                        f.write(value)
            elif "persistentVolumeClaim" in volume:
                # A claim outlives its pods: one directory per claim.
                claim = volume["persistentVolumeClaim"]["claimName"]
                path = os.path.join(self.work, "claims", claim)
                os.makedirs(path, exist_ok=True)
            elif "emptyDir" not in volume and "projected" not in volume:
                # (Projected: the service-account token, which nothing here reads.)
                raise ValueError(f"pod {name}: volume {mount['name']} is of a kind this test cannot play")
            local[mount["mountPath"].rstrip("/")] = path

        unresolved = []

        def rewrite(value):
            for mount_path, path in local.items():
                if value == mount_path or value.startswith(mount_path + "/"):
                    value = path + value[len(mount_path):]
            value = value.replace("0.0.0.0:", me + ":")
            if value == "0.0.0.0":
                value = me

            def resolve(match):
                host = match.group(0)
                if host in table:
                    return table[host]
                unresolved.append(host)
                return host

            return re.sub(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?\b", resolve, value)

        if container.get("command"):
            raise ValueError(f"pod {name}: sets a command; only the image's entrypoint is played here")
        argv = [self.args.binary] + [rewrite(a) for a in container.get("args") or []]
        env = dict(os.environ)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = rewrite(var["value"])
            elif "secretKeyRef" in (var.get("valueFrom") or {}):
                env[var["name"]] = self.secret_value(var["valueFrom"]["secretKeyRef"])
            elif (var.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[var["name"]] = name
            else:
                raise ValueError(f"pod {name}: env {var['name']} has a source this test cannot play")
        env.setdefault("RUST_LOG", "warn")
        if unresolved:
            return None
        return argv, env, root

    def start(self, pod, table, restarts=0):
        cmd = self.command(pod, table)
        if cmd is None:
            return
        argv, env, cwd = cmd
        name = pod["metadata"]["name"]
        log = open(os.path.join(self.work, "pods", f"{name}.log"), "a")
        log.write(f"# {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )
        self.procs[pod["metadata"]["uid"]] = (proc, pod, log, restarts)

    def stop(self, uid):
        proc, _, log, _ = self.procs.pop(uid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    def sync(self):
        pods = [
            p for p in self.kubectl.json("get", "pods", "-l", f"pipewright.dev/run={self.args.run}")["items"]
        ]
        services = self.kubectl.json("get", "services")["items"]
        live = {}
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                continue
            if (pod.get("status") or {}).get("phase") != "Running":
                continue
            live[pod["metadata"]["uid"]] = pod
            self.address_of(pod["metadata"]["name"])
        table = self.names(pods, services)
        self.write_hosts(table)
        # Stop what no longer runs (deleted, failed, moved).
        for uid in list(self.procs):
            if uid not in live:
                self.stop(uid)
        # Reap exits.
        for uid, (proc, pod, log, restarts) in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            log.close()
            del self.procs[uid]
            policy = pod["spec"].get("restartPolicy", "Always")
            if code != 0 and policy in ("OnFailure", "Always") and restarts < 3:
                self.start(pod, table, restarts + 1)
                continue
            self.done.add(uid)
            self.kubectl.set_phase(pod, "Succeeded" if code == 0 else "Failed", code)
        # Start what kwok says runs.
        for uid, pod in live.items():
            if uid not in self.procs and uid not in self.done:
                self.start(pod, table)

    def shutdown(self):
        for uid in list(self.procs):
            self.stop(uid)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--run", required=True, help="TrainingRun name (label pipewright.dev/run)")
    parser.add_argument("--binary", required=True, help="the image's entrypoint, here a local binary")
    parser.add_argument("--dir", required=True, help="directory for pod files and logs")
    parser.add_argument("--hosts", help="hosts file to keep in step with the pods' names")
    args = parser.parse_args()
    os.makedirs(os.path.join(args.dir, "pods"), exist_ok=True)
    kubelet = Kubelet(args)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    try:
        while not stopping:
            try:
                kubelet.sync()
            except subprocess.CalledProcessError as e:
                print(f"kubelet.py: {' '.join(e.cmd)}: {e.stderr.strip()}", file=sys.stderr)
            time.sleep(0.3)
    finally:
        kubelet.shutdown()


if __name__ == "__main__":
    main()
