#!/usr/bin/env python3
"""Translates the DaemonSet of a rendered deploy/ (kubectl kustomize) into
the CRI requests the kubelet would make for its pod, as crictl's JSON
files: pod.json (RunPodSandbox), <container>.json (CreateContainer, one per
container) and probe.json (the readiness probe's exec command, as the
kubelet runs it with ExecSync).

What the kubelet does and this does too: hostPID/hostNetwork/hostIPC as
NODE namespaces; a privileged sandbox when a container is privileged; the
container's command, args and image; its environment from envFrom
(ConfigMaps) then env; hostPath volumes as bind mounts with their
propagation and read-only flag; ConfigMap volumes as a directory of files
(the kubelet writes them under /var/lib/kubelet/pods/, here under --work).
What it leaves out: service-link variables, the service account token
(the pod mounts none), resources (cgroup limits), DNS files.

For a test node: --host-dir maps the hostPath `/` to a directory, --env
overrides a container variable, --configmap-file NAME/KEY=FILE replaces a
ConfigMap key's content.

Usage: daemonset_to_cri.py RENDERED.yaml OUTDIR --work DIR [--host-dir DIR]
       [--env K=V]... [--configmap-file NAME/KEY=FILE]..."""
import argparse
import json
import os
import uuid

import yaml

NODE = 2  # runtime.v1.NamespaceMode.NODE
PROPAGATION = {
    None: 0,
    "None": 0,
    "HostToContainer": 1,
    "Bidirectional": 2,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("outdir")
    ap.add_argument("--work", required=True)
    ap.add_argument("--host-dir", default="/")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--configmap-file", action="append", default=[])
    a = ap.parse_args()

    with open(a.rendered) as f:
        objs = [o for o in yaml.safe_load_all(f) if o]
    ds = [o for o in objs if o["kind"] == "DaemonSet"]
    if len(ds) != 1:
        raise SystemExit(f"expected one DaemonSet, found {len(ds)}")
    ds = ds[0]
    ns = ds["metadata"]["namespace"]
    configmaps = {(o["metadata"]["namespace"], o["metadata"]["name"]): dict(o.get("data", {}))
                  for o in objs if o["kind"] == "ConfigMap"}
    for spec in a.configmap_file:
        key, path = spec.split("=", 1)
        name, k = key.split("/", 1)
        with open(path) as f:
            configmaps[(ns, name)][k] = f.read()

    tmpl = ds["spec"]["template"]
    spec = tmpl["spec"]
    uid = str(uuid.uuid4())
    name = ds["metadata"]["name"] + "-" + uid[:5]
    os.makedirs(a.outdir, exist_ok=True)
    logdir = os.path.join(a.work, "pods", f"{ns}_{name}_{uid}")
    os.makedirs(logdir, exist_ok=True)
    nsopts = {
        "network": NODE if spec.get("hostNetwork") else 0,
        "pid": NODE if spec.get("hostPID") else 1,  # 1: POD (shared in the pod)
        "ipc": NODE if spec.get("hostIPC") else 0,
    }
    privileged = any(c.get("securityContext", {}).get("privileged") for c in spec["containers"])
    pod = {
        "metadata": {"name": name, "namespace": ns, "uid": uid, "attempt": 0},
        "hostname": "" if spec.get("hostNetwork") else name,
        "log_directory": logdir,
        "labels": dict(tmpl["metadata"].get("labels", {}),
                       **{"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": ns,
                          "io.kubernetes.pod.uid": uid}),
        "annotations": dict(tmpl["metadata"].get("annotations", {})),
        "linux": {"security_context": {"namespace_options": nsopts, "privileged": privileged}},
    }
    with open(os.path.join(a.outdir, "pod.json"), "w") as f:
        json.dump(pod, f, indent=1)

    # Volumes as the kubelet sets them up on the node.
    host_dir = a.host_dir.rstrip("/") or "/"
    volumes = {}
    for v in spec.get("volumes", []):
        if "hostPath" in v:
            p = v["hostPath"]["path"]
            hp = host_dir if p == "/" else (host_dir.rstrip("/") + p if host_dir != "/" else p)
            if v["hostPath"].get("type") == "Directory" and not os.path.isdir(hp):
                raise SystemExit(f"hostPath {hp} is not a directory")
            volumes[v["name"]] = hp
        elif "configMap" in v:
            d = os.path.join(a.work, "volumes", v["name"])
            os.makedirs(d, exist_ok=True)
            for k, text in configmaps[(ns, v["configMap"]["name"])].items():
                with open(os.path.join(d, k), "w") as f:
                    f.write(text)
            volumes[v["name"]] = d
        else:
            raise SystemExit(f"volume {v['name']}: only hostPath and configMap are translated")

    overrides = dict(e.split("=", 1) for e in a.env)
    for c in spec["containers"]:
        env = {}
        for src in c.get("envFrom", []):
            env.update(configmaps[(ns, src["configMapRef"]["name"])])
        for e in c.get("env", []):
            env[e["name"]] = e["value"]
        env.update(overrides)
        mounts = []
        for m in c.get("volumeMounts", []):
            mounts.append({
                "container_path": m["mountPath"],
                "host_path": volumes[m["name"]],
                "readonly": bool(m.get("readOnly")),
                "propagation": PROPAGATION[m.get("mountPropagation")],
            })
        sc = c.get("securityContext", {})
        ctr = {
            "metadata": {"name": c["name"], "attempt": 0},
            "image": {"image": c["image"]},
            "command": c.get("command", []),
            "args": c.get("args", []),
            "envs": [{"key": k, "value": v} for k, v in env.items()],
            "mounts": mounts,
            "labels": {"io.kubernetes.container.name": c["name"], "io.kubernetes.pod.name": name,
                       "io.kubernetes.pod.namespace": ns, "io.kubernetes.pod.uid": uid},
            "log_path": f"{c['name']}/0.log",
            "linux": {"security_context": {"privileged": bool(sc.get("privileged")), "namespace_options": nsopts}},
        }
        with open(os.path.join(a.outdir, c["name"] + ".json"), "w") as f:
            json.dump(ctr, f, indent=1)
        probe = c.get("readinessProbe", {}).get("exec", {}).get("command")
        if probe:
            with open(os.path.join(a.outdir, "probe.json"), "w") as f:
                json.dump({"container": c["name"], "command": probe,
                           "timeoutSeconds": c["readinessProbe"].get("timeoutSeconds", 1)}, f)


if __name__ == "__main__":
    main()
