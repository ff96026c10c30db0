//! Whether redirector-cni enrolls a pod, and with what: the one decision ADD and CHECK make from
//! the plugin's settings, CNI_ARGS and the annotations the runtime passed. Pure, so that every
//! path through it is unit-tested; the plugin only carries it out.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    annotations::{self, AnnotationError, PodSettings, Verdict, CAPABILITY},
    config::{CniArgs, PluginConfig, PodSelection},
};

/// Why a pod was not enrolled: it was passed through uncaptured, or its ADD failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// `REDIRECTOR_SKIP=true` in CNI_ARGS.
    SkipArg,
    /// The pod's namespace is in `skipNamespaces`.
    ExcludedNamespace,
    /// No `sidecar.istio.io/status`: the injector did not touch the pod.
    NotInjected,
    /// `sidecar.istio.io/inject` is false.
    InjectDisabled,
    /// The status lists `istio-init`: iptables captures the pod already.
    IstioInit,
    /// The status lists no `istio-proxy` container.
    NoIstioProxy,
    /// `inject.istio.io/templates` names no `sidecar` template (a gateway, a proxyless pod).
    NotSidecar,
    /// `sidecar.istio.io/interceptionMode` is NONE.
    InterceptionNone,
    /// ADD failed: the runtime passed no annotations.
    NoAnnotations,
    /// ADD failed: an annotation asks for what redirector does not implement (TPROXY...).
    Unsupported,
    /// ADD failed: an annotation does not parse or is too large.
    BadAnnotation,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Self::SkipArg,
        Self::ExcludedNamespace,
        Self::NotInjected,
        Self::InjectDisabled,
        Self::IstioInit,
        Self::NoIstioProxy,
        Self::NotSidecar,
        Self::InterceptionNone,
        Self::NoAnnotations,
        Self::Unsupported,
        Self::BadAnnotation,
    ];

    /// Whether this reason fails the pod's ADD (the others pass the pod through uncaptured).
    pub fn fails_add(self) -> bool {
        matches!(
            self,
            Self::NoAnnotations | Self::Unsupported | Self::BadAnnotation
        )
    }

    /// The name in metrics labels and in `status` (as serialized).
    pub fn name(self) -> &'static str {
        match self {
            Self::SkipArg => "skip_arg",
            Self::ExcludedNamespace => "excluded_namespace",
            Self::NotInjected => "not_injected",
            Self::InjectDisabled => "inject_disabled",
            Self::IstioInit => "istio_init",
            Self::NoIstioProxy => "no_istio_proxy",
            Self::NotSidecar => "not_sidecar",
            Self::InterceptionNone => "interception_none",
            Self::NoAnnotations => "no_annotations",
            Self::Unsupported => "unsupported",
            Self::BadAnnotation => "bad_annotation",
        }
    }

    /// Why, in words, for the log line of a skipped pod.
    pub fn describe(self) -> &'static str {
        match self {
            Self::SkipArg => "REDIRECTOR_SKIP=true in CNI_ARGS",
            Self::ExcludedNamespace => "the pod's namespace is in skipNamespaces",
            Self::NotInjected => {
                "no sidecar.istio.io/status annotation: Istio's injector did not prepare the pod"
            }
            Self::InjectDisabled => "sidecar.istio.io/inject is false",
            Self::IstioInit => "the pod has istio-init: iptables captures it already",
            Self::NoIstioProxy => "sidecar.istio.io/status lists no istio-proxy container",
            Self::NotSidecar => {
                "inject.istio.io/templates names no sidecar template (a gateway or a proxyless pod)"
            }
            Self::InterceptionNone => "sidecar.istio.io/interceptionMode is NONE",
            Self::NoAnnotations => "the runtime passed no pod annotations",
            Self::Unsupported => "an annotation asks for what redirector does not implement",
            Self::BadAnnotation => "an annotation is malformed or too large",
        }
    }
}

/// What to do with a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Enroll it: with its annotations' settings over the node's policy, or (`podSelection`
    /// all) with the node's policy alone.
    Enroll(Option<PodSettings>),
    /// Pass it through uncaptured.
    Skip(Reason),
}

/// Why a pod's ADD fails.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("the runtime passed no pod annotations (runtimeConfig[\"{CAPABILITY}\"]), so redirector cannot tell whether Istio injected this pod, and neither captures nor skips it: {fix}")]
    NoAnnotations { fix: &'static str },
    #[error("runtimeConfig[\"{CAPABILITY}\"] is not a map of strings: {found}")]
    NotAStringMap { found: String },
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
}

const FIX_UNDECLARED: &str = "this plugin's conflist entry does not declare the capability; run `redirector install-cni` again (it writes the entry with \"capabilities\": {\"io.kubernetes.cri.pod-annotations\": true}), or set \"podSelection\": \"all\" to capture every pod with the node's policy";
const FIX_RUNTIME: &str = "the conflist entry declares the capability, so the container runtime does not support it (containerd 1.5 or later and CRI-O 1.29 or later do): upgrade the runtime, or set \"podSelection\": \"all\" to capture every pod with the node's policy";

impl Refusal {
    pub fn reason(&self) -> Reason {
        match self {
            Self::NoAnnotations { .. } => Reason::NoAnnotations,
            Self::Annotation(error) if error.is_unsupported() => Reason::Unsupported,
            Self::NotAStringMap { .. } | Self::Annotation(_) => Reason::BadAnnotation,
        }
    }
}

/// The pod's annotations as the runtime passed them: `None` when it passed none (key absent),
/// an empty map for `null` (a pod without annotations, as Go marshals a nil map).
pub fn runtime_annotations(
    passed: Option<&serde_json::Value>,
) -> Result<Option<BTreeMap<String, String>>, Refusal> {
    match passed {
        None => Ok(None),
        Some(serde_json::Value::Null) => Ok(Some(BTreeMap::new())),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|e| Refusal::NotAStringMap {
                found: e.to_string(),
            }),
    }
}

/// The decision for a pod. `declared`: whether the plugin's conflist entry declares the
/// annotations capability; `passed`: `runtimeConfig["io.kubernetes.cri.pod-annotations"]`.
pub fn decide(
    config: &PluginConfig,
    args: &CniArgs,
    declared: bool,
    passed: Option<&serde_json::Value>,
) -> Result<Decision, Refusal> {
    if args.skip {
        return Ok(Decision::Skip(Reason::SkipArg));
    }
    let namespace = args.pod_namespace.as_deref();
    if namespace.is_some_and(|ns| config.skip_namespaces.iter().any(|skip| skip == ns)) {
        return Ok(Decision::Skip(Reason::ExcludedNamespace));
    }
    if config.pod_selection == PodSelection::All {
        return Ok(Decision::Enroll(None));
    }
    let Some(annotations) = runtime_annotations(passed)? else {
        let fix = if declared {
            FIX_RUNTIME
        } else {
            FIX_UNDECLARED
        };
        return Err(Refusal::NoAnnotations { fix });
    };
    Ok(match annotations::read(&annotations)? {
        Verdict::Capture(settings) => Decision::Enroll(Some(settings)),
        Verdict::Skip(reason) => Decision::Skip(reason),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;
    use crate::cni::annotations::keys;

    fn config(keys: serde_json::Value) -> PluginConfig {
        let keys: HashMap<String, serde_json::Value> = serde_json::from_value(keys).unwrap();
        PluginConfig::from_keys(&keys).unwrap()
    }

    fn args(namespace: &str) -> CniArgs {
        CniArgs {
            pod_namespace: Some(namespace.into()),
            pod_name: Some("web-0".into()),
            pod_uid: Some("uid".into()),
            ..CniArgs::default()
        }
    }

    fn injected() -> serde_json::Value {
        json!({
            keys::STATUS: r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"]}"#,
            keys::EXCLUDE_OUTBOUND_PORTS: "5432",
        })
    }

    #[test]
    fn istio_selection_enrolls_injected_pods_with_their_settings() {
        let decision = decide(
            &config(json!({})),
            &args("default"),
            true,
            Some(&injected()),
        );
        let Ok(Decision::Enroll(Some(settings))) = decision else {
            panic!("{decision:?}")
        };
        assert_eq!(settings.outbound_ports_exclude, vec![5432]);
        assert_eq!(
            decide(&config(json!({})), &args("default"), true, Some(&json!({}))),
            Ok(Decision::Skip(Reason::NotInjected))
        );
        assert_eq!(
            decide(
                &config(json!({})),
                &args("default"),
                true,
                Some(&json!(null))
            ),
            Ok(Decision::Skip(Reason::NotInjected)),
            "null: a pod without annotations"
        );
    }

    #[test]
    fn skips_come_before_annotations_are_needed() {
        let plain = config(json!({}));
        assert_eq!(
            decide(&plain, &args("kube-system"), false, None),
            Ok(Decision::Skip(Reason::ExcludedNamespace)),
            "kube-system is skipped by default"
        );
        let custom = config(json!({"skipNamespaces": ["batch"]}));
        assert_eq!(
            decide(&custom, &args("batch"), true, Some(&injected())),
            Ok(Decision::Skip(Reason::ExcludedNamespace))
        );
        assert!(matches!(
            decide(&custom, &args("kube-system"), true, Some(&injected())),
            Ok(Decision::Enroll(Some(_)))
        ));
        let skip_arg = CniArgs {
            skip: true,
            ..args("default")
        };
        assert_eq!(
            decide(&plain, &skip_arg, false, None),
            Ok(Decision::Skip(Reason::SkipArg))
        );
    }

    #[test]
    fn no_annotations_fails_naming_the_cause_and_the_fix() {
        let plain = config(json!({}));
        for (declared, fix) in [(false, "install-cni"), (true, "containerd 1.5")] {
            let refusal = decide(&plain, &args("default"), declared, None).unwrap_err();
            assert_eq!(refusal.reason(), Reason::NoAnnotations);
            let message = refusal.to_string();
            assert!(
                message.contains("no pod annotations")
                    && message.contains(fix)
                    && message.contains("podSelection"),
                "{message}"
            );
        }
    }

    #[test]
    fn pod_selection_all_needs_no_annotations_and_ignores_them() {
        let all = config(json!({"podSelection": "all"}));
        assert_eq!(
            decide(&all, &args("default"), false, None),
            Ok(Decision::Enroll(None))
        );
        assert_eq!(
            decide(&all, &args("default"), true, Some(&injected())),
            Ok(Decision::Enroll(None))
        );
        assert_eq!(
            decide(&all, &args("kube-system"), false, None),
            Ok(Decision::Skip(Reason::ExcludedNamespace))
        );
    }

    #[test]
    fn refusals_carry_their_reason() {
        let plain = config(json!({}));
        let with = |key: &str, value: &str| {
            let mut annotations = injected();
            annotations[key] = value.into();
            decide(&plain, &args("default"), true, Some(&annotations))
                .unwrap_err()
                .reason()
        };
        assert_eq!(with(keys::INTERCEPTION_MODE, "TPROXY"), Reason::Unsupported);
        assert_eq!(
            with(keys::EXCLUDE_OUTBOUND_PORTS, "80,x"),
            Reason::BadAnnotation
        );
        let not_strings = decide(&plain, &args("default"), true, Some(&json!({"a": 1})));
        assert_eq!(not_strings.unwrap_err().reason(), Reason::BadAnnotation);
        let not_a_map = decide(&plain, &args("default"), true, Some(&json!(["a"])));
        assert_eq!(not_a_map.unwrap_err().reason(), Reason::BadAnnotation);
    }

    #[test]
    fn reason_names_are_their_serialized_form() {
        for reason in Reason::ALL {
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                json!(reason.name()),
                "{reason:?}"
            );
            assert!(!reason.describe().is_empty());
        }
        let failing: Vec<_> = Reason::ALL.into_iter().filter(|r| r.fails_add()).collect();
        assert_eq!(
            failing,
            [
                Reason::NoAnnotations,
                Reason::Unsupported,
                Reason::BadAnnotation
            ]
        );
    }
}
