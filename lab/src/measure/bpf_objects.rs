//! redirector's BPF objects, found by what is pinned under its bpffs root rather than by a
//! list of names: the programs pinned there and the programs of the links pinned there (so a
//! new hook is counted as soon as redirector pins it), and the maps pinned there. bpftool
//! does the listing (`-f` names each object's pins), with each program's full name from BTF
//! and the kernel's run-time accounting.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// One program's identity and the kernel's counters at the moment of the listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramState {
    pub name: String,
    /// Attach types of the links pinned under the root that run this program.
    pub hooks: Vec<String>,
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

#[derive(Deserialize)]
struct BpftoolProgram {
    id: u32,
    #[serde(default)]
    name: Option<String>,
    /// Absent while the kernel's accounting has counted nothing.
    #[serde(default)]
    run_time_ns: u64,
    #[serde(default)]
    run_cnt: u64,
    #[serde(default)]
    pinned: Vec<String>,
}

#[derive(Deserialize)]
struct BpftoolLink {
    #[serde(default)]
    prog_id: Option<u32>,
    /// Cgroup links only.
    #[serde(default)]
    cgroup_id: Option<u64>,
    #[serde(default)]
    attach_type: Option<String>,
    #[serde(default)]
    pinned: Vec<String>,
}

#[derive(Deserialize)]
struct BpftoolMap {
    #[serde(default)]
    bytes_memlock: u64,
    #[serde(default)]
    pinned: Vec<String>,
}

/// `bpftool -j -f <object> show`, parsed.
fn bpftool_list<T: DeserializeOwned>(object: &str) -> Result<Vec<T>> {
    let output = Command::new("bpftool")
        .args(["-j", "-f", object, "show"])
        .output()
        .context("running bpftool (is it installed?)")?;
    ensure!(
        output.status.success(),
        "bpftool {object} show failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("parsing bpftool's list of {object}s"))
}

fn pinned_under(pins: &[String], root: &Path) -> bool {
    pins.iter().any(|pin| Path::new(pin).starts_with(root))
}

/// The programs pinned under `root` or run by a link pinned there, by program id.
pub fn programs_under(root: &Path) -> Result<BTreeMap<u32, ProgramState>> {
    let links: Vec<BpftoolLink> = bpftool_list("link")?;
    let programs: Vec<BpftoolProgram> = bpftool_list("prog")?;
    Ok(select_programs(root, programs, links))
}

fn select_programs(
    root: &Path,
    programs: Vec<BpftoolProgram>,
    links: Vec<BpftoolLink>,
) -> BTreeMap<u32, ProgramState> {
    let mut hooks: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for link in links.iter().filter(|link| pinned_under(&link.pinned, root)) {
        if let Some(id) = link.prog_id {
            let hooks = hooks.entry(id).or_default();
            if let Some(hook) = &link.attach_type {
                if !hooks.contains(hook) {
                    hooks.push(hook.clone());
                }
            }
        }
    }
    programs
        .into_iter()
        .filter_map(|program| {
            let linked = hooks.remove(&program.id);
            if linked.is_none() && !pinned_under(&program.pinned, root) {
                return None;
            }
            let state = ProgramState {
                name: program
                    .name
                    .unwrap_or_else(|| format!("program {}", program.id)),
                hooks: linked.unwrap_or_default(),
                run_cnt: program.run_cnt,
                run_time_ns: program.run_time_ns,
            };
            Some((program.id, state))
        })
        .collect()
}

/// The cgroups that links pinned under `root` attach programs to, by cgroup id.
pub fn cgroups_linked_under(root: &Path) -> Result<BTreeSet<u64>> {
    let links: Vec<BpftoolLink> = bpftool_list("link")?;
    Ok(links
        .iter()
        .filter(|link| pinned_under(&link.pinned, root))
        .filter_map(|link| link.cgroup_id)
        .collect())
}

/// Memory the kernel accounts to the maps pinned under `root` (bpftool's `bytes_memlock`).
pub fn map_memory_under(root: &Path) -> Result<u64> {
    let maps: Vec<BpftoolMap> = bpftool_list("map")?;
    Ok(maps
        .iter()
        .filter(|map| pinned_under(&map.pinned, root))
        .map(|map| map.bytes_memlock)
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_by_their_pins_and_their_links_pins() {
        let programs: Vec<BpftoolProgram> = serde_json::from_str(
            r#"[
              {"id": 1, "name": "redirector_connect4", "run_time_ns": 500, "run_cnt": 2,
               "pinned": ["/sys/fs/bpf/lab/progs/redirector_connect4"]},
              {"id": 2, "name": "redirector_sockops",
               "pinned": ["/sys/fs/bpf/lab/progs/redirector_sockops"]},
              {"id": 3, "name": "hook_only_linked", "run_time_ns": 9, "run_cnt": 1},
              {"id": 4, "name": "someone_elses", "pinned": ["/sys/fs/bpf/lab2/progs/x"]}
            ]"#,
        )
        .unwrap();
        let links: Vec<BpftoolLink> = serde_json::from_str(
            r#"[
              {"id": 10, "prog_id": 1, "attach_type": "cgroup_inet4_connect",
               "pinned": ["/sys/fs/bpf/lab/pods/7/connect4"]},
              {"id": 11, "prog_id": 1, "attach_type": "cgroup_inet4_connect",
               "pinned": ["/sys/fs/bpf/lab/pods/8/connect4"]},
              {"id": 12, "prog_id": 3, "attach_type": "sk_lookup",
               "pinned": ["/sys/fs/bpf/lab/pods/7/inbound"]},
              {"id": 13, "prog_id": 4, "attach_type": "cgroup_sock_ops",
               "pinned": ["/sys/fs/bpf/lab2/pods/7/sockops"]}
            ]"#,
        )
        .unwrap();
        let found = select_programs(Path::new("/sys/fs/bpf/lab"), programs, links);
        assert_eq!(found.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(
            found[&1],
            ProgramState {
                name: "redirector_connect4".into(),
                hooks: vec!["cgroup_inet4_connect".into()],
                run_cnt: 2,
                run_time_ns: 500,
            }
        );
        assert_eq!((found[&2].run_cnt, found[&2].hooks.len()), (0, 0));
        assert_eq!(found[&3].hooks, ["sk_lookup"]);
    }
}
