//! The three-container pod of the checkpoint and restore issues: a counter
//! writing to stdout and to a file in its rootfs, a TCP server, and a
//! counter writing into the sandbox's /dev/shm.

use std::path::PathBuf;
use std::time::Duration;

use podckpt::cri::client::CriClient;

use super::cri::{start_container, PodGuard};
use super::runtime::Runtime;
use super::testbed::Testbed;

/// The three-container pod of the checkpoint issue.
pub struct Pod {
    pub _guard: PodGuard,
    pub id: String,
    /// name -> id, in creation order.
    pub containers: Vec<(String, String)>,
    pub _log_dir: tempfile::TempDir,
    pub log_dir: PathBuf,
}

// The counters replace their files atomically (write, then rename): a cut
// can fall between a shell's truncation and its write, and a file caught
// empty there says nothing about where the counter was.
pub const COUNTER: &str = "mkdir -p /data; i=0; while true; do i=$((i+1)); echo \"count $i\"; echo $i > /data/counter.new; mv /data/counter.new /data/counter; sleep 0.1; done";
pub const WEB: &str =
    "mkdir -p /www && echo podckpt > /www/index.html && exec httpd -f -p 8080 -h /www";
pub const SHM: &str =
    "i=0; while true; do i=$((i+1)); echo $i > /dev/shm/shmcount.new; mv /dev/shm/shmcount.new /dev/shm/shmcount; sleep 0.1; done";

/// The pod on containerd 2.1 (the test bed's default runtime).
pub async fn three_container_pod(client: &mut CriClient, tb: &Testbed, name: &str) -> Pod {
    three_container_pod_on(Runtime::Containerd2, client, tb, name).await
}

/// The pod on `rt`, with the configs that runtime accepts; `client` talks
/// to (a podckptd in front of) that runtime.
pub async fn three_container_pod_on(
    rt: Runtime,
    client: &mut CriClient,
    tb: &Testbed,
    name: &str,
) -> Pod {
    let log_dir = tempfile::tempdir().unwrap();
    let (guard, id, config) = rt.run_pod(client, name, log_dir.path()).await;
    let mut containers = vec![];
    for (cname, script) in [("counter", COUNTER), ("web", WEB), ("shm", SHM)] {
        let cid = start_container(
            client,
            &id,
            &config,
            rt.container_config(tb, cname, &["/bin/sh", "-c", script]),
        )
        .await;
        containers.push((cname.to_string(), cid));
    }
    // Let the counters run a little.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let path = log_dir.path().to_path_buf();
    Pod {
        _guard: guard,
        id,
        containers,
        _log_dir: log_dir,
        log_dir: path,
    }
}

impl Pod {
    pub fn ids(&self) -> Vec<String> {
        self.containers.iter().map(|(_, id)| id.clone()).collect()
    }
}
