//! The real test bed (scripts/testbed.sh): its environment file, and the
//! rule that a missing test bed skips for a newcomer but fails under CI.

use std::collections::HashMap;
use std::path::PathBuf;

/// Where `scripts/testbed.sh up` writes what it started.
pub const ENV_FILE: &str = "/run/podckpt-testbed/testbed.env";

/// The test bed as described by its environment file.
#[derive(Clone, Debug)]
pub struct Testbed {
    pub vars: HashMap<String, String>,
}

impl Testbed {
    /// The test bed, or `None` (after printing why) when it is not there and
    /// `PODCKPT_E2E` is not set. With `PODCKPT_E2E=1` a missing test bed
    /// panics: CI must not pass by skipping.
    pub fn get(test: &str) -> Option<Self> {
        let required = std::env::var("PODCKPT_E2E").is_ok_and(|v| v == "1");
        let problem = if !nix::unistd::Uid::effective().is_root() {
            Some("needs root".to_string())
        } else {
            match std::fs::read_to_string(ENV_FILE) {
                Ok(text) => {
                    let vars: HashMap<String, String> = text
                        .lines()
                        .filter_map(|l| l.split_once('='))
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .collect();
                    return Some(Self { vars });
                }
                Err(err) => Some(format!(
                    "no test bed ({ENV_FILE}: {err}); run `sudo scripts/testbed.sh up`"
                )),
            }
        };
        let problem = problem.unwrap_or_default();
        if required {
            panic!("{test}: PODCKPT_E2E=1 but the test bed is unusable: {problem}");
        }
        eprintln!("SKIPPED {test}: {problem}");
        None
    }

    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{ENV_FILE} lacks {key}"))
    }

    pub fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.var(key))
    }
}
