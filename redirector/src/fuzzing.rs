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

    /// The committed corpus of the target `name`: (file, bytes).
    fn corpus(name: &str) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| {
                let path = entry.expect("a corpus entry").path();
                let data = std::fs::read(&path).expect("a corpus file");
                (path, data)
            })
            .collect();
        assert!(!inputs.is_empty(), "{}: no seeds", dir.display());
        inputs.sort();
        inputs
    }

    /// Every committed corpus file of every target, crash regressions included, goes through
    /// its target without a panic.
    #[test]
    fn the_committed_corpus_replays_without_a_panic() {
        for (name, target) in TARGETS {
            for (path, data) in corpus(name) {
                let replayed = std::panic::catch_unwind(|| target(&data));
                assert!(replayed.is_ok(), "{name} panicked on {}", path.display());
            }
        }
    }

    /// xorshift64: a fixed sequence, so that a failing mutation is found again by the next run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n.max(1) as u64).expect("below n")
        }
    }

    /// Bytes and tokens the parsers treat specially.
    const TOKENS: &[&[u8]] = &[
        b"\"",
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"=",
        b"\n",
        b"\\",
        b"\0",
        b"-1",
        b"0",
        b"65536",
        b"4294967296",
        b"18446744073709551616",
        b"*",
        b"/",
        b"::",
        b"0.0.0.0/0",
        b"\xff\xfe",
        b"null",
        b"true",
        b"1e400",
    ];

    /// One random edit of `data`: a bit flipped, a range removed or doubled, a token inserted,
    /// the end cut, or a splice with `other`.
    fn mutate(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 => {
                let end = (at + rng.below(16) + 1).min(out.len());
                out.drain(at..end);
            }
            2 => {
                let end = (at + rng.below(64) + 1).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            4 => out.truncate(at),
            _ => {
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
        }
        out
    }

    /// CI's short fuzzing pass (`cargo xtask fuzz` is the coverage-guided one): 3,000 inputs
    /// per target, each made by up to four random edits of a seed, none of which may panic. A
    /// panic prints the input, to be added to fuzz/corpus/NAME as a regression case.
    #[test]
    fn mutated_seeds_go_through_every_target_without_a_panic() {
        const INPUTS_PER_TARGET: usize = 3_000;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for (name, target) in TARGETS {
            let seeds = corpus(name);
            for _ in 0..INPUTS_PER_TARGET {
                let mut data = seeds[rng.below(seeds.len())].1.clone();
                for _ in 0..=rng.below(4) {
                    let other = &seeds[rng.below(seeds.len())].1;
                    data = mutate(&mut rng, &data, other);
                }
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(
                    outcome.is_ok(),
                    "{name} panicked on {:?}",
                    String::from_utf8_lossy(&data)
                );
            }
        }
    }
}
