#!/usr/bin/env python3
"""Builds the test bed's OCI images as image-layout tar archives, from
static binaries only (no registry is reachable): pause, app (busybox) and
memhog. Usage: build_images.py OUTDIR. Writes OUTDIR/<name>.tar, each with
the io.containerd.image.name annotation `ctr images import` uses.

`build_images.py --podckpt STAGEDIR NAME OUT` builds the DaemonSet's image
instead (scripts/build_podckpt_image.sh prepares STAGEDIR): busybox, with
STAGEDIR as /opt/podckpt and its install.sh as the entrypoint."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BUSYBOX = "/bin/busybox"  # Debian's busybox-static


def add_file(tar, name, data, mode=0o755):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, name, mode=0o755):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    tar.addfile(info)


def add_link(tar, name, target):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)


def static_binary(src, workdir):
    out = os.path.join(workdir, os.path.basename(src)[:-2])
    subprocess.run(["gcc", "-static", "-O2", "-o", out, src], check=True)
    subprocess.run(["strip", out], check=False)
    with open(out, "rb") as f:
        return f.read()


def busybox_tree(tar):
    for d in ["bin", "tmp", "etc", "www", "data"]:
        add_dir(tar, d, 0o1777 if d == "tmp" else 0o755)
    with open(BUSYBOX, "rb") as f:
        add_file(tar, "bin/busybox", f.read())
    applets = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout.split()
    for a in applets:
        if a != "busybox":
            add_link(tar, "bin/" + a, "busybox")
    add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644)
    add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)


def layer(build):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        build(tar)
    return buf.getvalue()


def blob(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    blobs["sha256:" + digest] = data
    return "sha256:" + digest


def image(name, layer_data, entrypoint, cmd, env, out):
    blobs = {}
    layer_digest = blob(blobs, layer_data)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": ["PATH=/bin"] + env, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "podckpt scripts/build_images.py"}],
    }
    config_data = json.dumps(config, sort_keys=True).encode()
    config_digest = blob(blobs, config_data)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config_data)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer_data)}],
    }
    manifest_data = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = blob(blobs, manifest_data)
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest_data),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "test"},
        }],
    }
    tmp = out + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        add_file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644)
        add_file(tar, "index.json", json.dumps(index).encode(), 0o644)
        add_dir(tar, "blobs")
        add_dir(tar, "blobs/sha256")
        for digest, data in blobs.items():
            add_file(tar, "blobs/sha256/" + digest.split(":")[1], data, 0o644)
    os.replace(tmp, out)


def tree_at(tar, src, arcname):
    """src (files, directories, symlinks) at arcname, owned by root, with
    fixed times so that equal input gives an equal layer."""
    def norm(info):
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        return info
    tar.add(src, arcname=arcname, recursive=True, filter=norm)


def podckpt_image(stage, name, out):
    def tree(tar):
        busybox_tree(tar)
        add_dir(tar, "opt")
        tree_at(tar, stage, "opt/podckpt")
    image(name, layer(tree), ["/opt/podckpt/install.sh"], None, [], out)


def main():
    if sys.argv[1] == "--podckpt":
        podckpt_image(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        pause = static_binary(os.path.join(HERE, "images", "pause.c"), work)
        memhog = static_binary(os.path.join(HERE, "images", "memhog.c"), work)

    def pause_tree(tar):
        add_file(tar, "pause", pause)

    def memhog_tree(tar):
        busybox_tree(tar)
        add_file(tar, "memhog", memhog)

    counter = "i=0; while true; do echo $i; i=$((i+1)); sleep 1; done"
    image("localhost/podckpt/pause:test", layer(pause_tree), ["/pause"], None, [], os.path.join(outdir, "pause.tar"))
    image("localhost/podckpt/app:test", layer(busybox_tree), None, ["/bin/sh", "-c", counter], [], os.path.join(outdir, "app.tar"))
    image("localhost/podckpt/memhog:test", layer(memhog_tree), ["/memhog"], None,
          ["MEMHOG_MB=64", "MEMHOG_RANDOM_PCT=50"], os.path.join(outdir, "memhog.tar"))


if __name__ == "__main__":
    main()
