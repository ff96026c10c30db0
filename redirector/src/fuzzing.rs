//! The parsers of untrusted input, each as one function of arbitrary bytes: the fuzz targets
//! (`fuzz/`, `cargo xtask fuzz`) call them, and so does a unit test that replays every committed
//! corpus file (fuzz/corpus), so that the inputs of crashes found once are checked on every test
//! run. Each must return, an error being a fine answer, and never panic.
use std::{collections::BTreeMap, path::Path};

use crate::{
    agent::{api, config::ConfigFile},
    cni::{
        annotations,
        config::{CniArgs, PluginConfig},
        plugin,
    },
    flags::IstioIptables,
};

/// A fuzz target: one parser of untrusted bytes.
pub type Target = fn(&[u8]);

/// The fuzz targets by name (fuzz/fuzz_targets/NAME.rs, corpus in fuzz/corpus/NAME).
pub const TARGETS: [(&str, Target); 6] = [
    ("istio_iptables", istio_iptables),
    ("cni_config", cni_config),
    ("cni_args", cni_args),
    ("annotations", pod_annotations),
    ("api_request", api_request),
    ("agent_toml", agent_toml),
];

/// An istio-iptables line, as `redirector enroll` takes it.
pub fn istio_iptables(data: &[u8]) {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = IstioIptables::policy_of_line(line);
    }
}

/// The CNI plugin's stdin (network config with `prevResult` and `runtimeConfig`), through what
/// ADD does with it before it asks the agent: the plugin's keys, the capture decision, and the
/// previous result it hands back.
pub fn cni_config(data: &[u8]) {
    let Ok(net_conf) = serde_json::from_slice::<rscni_plugin::types::NetConf>(data) else {
        return;
    };
    let _ = net_conf.version();
    let _ = net_conf.validate_name();
    let Ok(config) = PluginConfig::from_keys(&net_conf.custom) else {
        return;
    };
    let _ = config.timeout();
    let _ = plugin::decide(&config, &net_conf, &CniArgs::default());
    if let Some(previous) = &net_conf.prev_result {
        let _ = serde_json::to_vec(previous);
    }
}

/// The CNI_ARGS environment variable.
pub fn cni_args(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = CniArgs::parse(Some(text));
    }
}

/// A pod's annotations, one `name=value` a line, read as the CNI plugin reads them and applied
/// to the default policy.
pub fn pod_annotations(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pod: BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    if let Ok(annotations::Verdict::Capture(settings)) = annotations::read(&pod) {
        let _ = settings.apply(&crate::policy::Policy::default());
    }
}

/// One line of the agent's API.
pub fn api_request(data: &[u8]) {
    let _ = api::parse_request_line(data);
}

/// The agent's TOML config file.
pub fn agent_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ConfigFile::parse(Path::new("fuzz.toml"), text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed corpus file of every target, crash regressions included, goes through
    /// its target without a panic.
    #[test]
    fn the_committed_corpus_replays_without_a_panic() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (name, target) in TARGETS {
            let dir = corpus.join(name);
            let inputs: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|entry| entry.expect("a corpus entry").path())
                .collect();
            assert!(!inputs.is_empty(), "{}: no seeds", dir.display());
            for input in inputs {
                let data = std::fs::read(&input).expect("a corpus file");
                let replayed = std::panic::catch_unwind(|| target(&data));
                assert!(replayed.is_ok(), "{name} panicked on {}", input.display());
            }
        }
    }
}
