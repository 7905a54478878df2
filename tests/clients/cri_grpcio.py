"""A CRI client on Python's grpcio (gRPC C-core), as operators' tools use:
creates a pod and a container, starts it, checkpoints it, removes the pod.

    python cri_grpcio.py PROTO_DIR ENDPOINT_SOCKET WORK_DIR POD_NAME IMAGE PAUSE_IMAGE

Prints one JSON object per step: {"step": ..., "code": <grpc code name>,
"detail": ...}; the caller compares two endpoints' lines. Stubs are
generated from the project's own proto into WORK_DIR first. The channel
takes grpcio's defaults, so its :authority is what C-core sends for a
unix socket (the socket's path, percent-encoded).
"""

import json
import os
import sys
import uuid

from grpc_tools import protoc
import grpc


def main():
    proto_dir, socket, work, name, image, pause = sys.argv[1:7]
    out = os.path.join(work, "stubs")
    os.makedirs(out, exist_ok=True)
    rc = protoc.main(["protoc", "-I", proto_dir, "--python_out", out,
                      "--grpc_python_out", out, os.path.join(proto_dir, "api.proto")])
    if rc != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    import api_pb2 as api
    import api_pb2_grpc as rpc

    channel = grpc.insecure_channel("unix://" + socket)
    rt = rpc.RuntimeServiceStub(channel)

    def step(label, fn):
        try:
            resp = fn()
            print(json.dumps({"step": label, "code": "OK"}), flush=True)
            return resp
        except grpc.RpcError as err:
            print(json.dumps({"step": label, "code": err.code().name,
                              "detail": err.details()}), flush=True)
            return None

    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    meta = api.PodSandboxMetadata(name=name, namespace="podckpt-e2e", uid=str(uuid.uuid4()), attempt=0)
    pod_cfg = api.PodSandboxConfig(metadata=meta, log_directory=logs, hostname=name,
                                   linux=api.LinuxPodSandboxConfig())
    step("Version", lambda: rt.Version(api.VersionRequest(), timeout=10))
    pod = step("RunPodSandbox", lambda: rt.RunPodSandbox(api.RunPodSandboxRequest(config=pod_cfg), timeout=60))
    if pod is None:
        return
    try:
        ctr_cfg = api.ContainerConfig(
            metadata=api.ContainerMetadata(name="counter", attempt=0),
            image=api.ImageSpec(image=image),
            command=["/bin/sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done"],
            log_path="counter.log",
            linux=api.LinuxContainerConfig(),
        )
        ctr = step("CreateContainer", lambda: rt.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=pod.pod_sandbox_id, config=ctr_cfg, sandbox_config=pod_cfg), timeout=60))
        if ctr is None:
            return
        step("StartContainer", lambda: rt.StartContainer(
            api.StartContainerRequest(container_id=ctr.container_id), timeout=60))
        archive = os.path.join(work, "counter.tar")
        step("CheckpointContainer", lambda: rt.CheckpointContainer(api.CheckpointContainerRequest(
            container_id=ctr.container_id, location=archive, timeout=60), timeout=120))
        size = os.path.getsize(archive) if os.path.exists(archive) else 0
        print(json.dumps({"step": "archive", "code": "OK" if size > 0 else "MISSING"}), flush=True)
        status = rt.ContainerStatus(api.ContainerStatusRequest(container_id=ctr.container_id), timeout=10)
        state = api.ContainerState.Name(status.status.state)
        print(json.dumps({"step": "state after checkpoint", "code": state}), flush=True)
    finally:
        step("StopPodSandbox", lambda: rt.StopPodSandbox(
            api.StopPodSandboxRequest(pod_sandbox_id=pod.pod_sandbox_id), timeout=60))
        step("RemovePodSandbox", lambda: rt.RemovePodSandbox(
            api.RemovePodSandboxRequest(pod_sandbox_id=pod.pod_sandbox_id), timeout=60))


if __name__ == "__main__":
    main()
