//! Which CPU each side of the traffic runs on.

use std::ffi::OsString;

use serde::Serialize;

/// The client on one core, proxies and server on another.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CpuPlan {
    pub client: Option<usize>,
    pub proxy_and_server: Option<usize>,
}

impl CpuPlan {
    pub fn detect() -> CpuPlan {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus >= 2 {
            CpuPlan {
                client: Some(0),
                proxy_and_server: Some(1),
            }
        } else {
            CpuPlan {
                client: None,
                proxy_and_server: None,
            }
        }
    }

    pub fn describe(&self) -> String {
        match (self.client, self.proxy_and_server) {
            (Some(client), Some(rest)) => {
                format!("client on CPU {client}; proxies and server on CPU {rest}")
            }
            _ => "not pinned (one CPU)".to_owned(),
        }
    }
}

/// `command` run by `taskset -c CPU` when there is a CPU to pin to.
pub fn pinned(cpu: Option<usize>, command: Vec<OsString>) -> Vec<OsString> {
    match cpu {
        Some(cpu) => ["taskset".into(), "-c".into(), cpu.to_string().into()]
            .into_iter()
            .chain(command)
            .collect(),
        None => command,
    }
}
