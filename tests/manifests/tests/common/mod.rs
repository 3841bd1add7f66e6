//! Helpers of the manifest tests: the rendered overlays (once per test binary), typed views, and mutations of a
//! copy. Each test binary uses a part of them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use kosmos_manifests::{Catalogue, Manifests, Profile};
use serde_json::Value;
pub const PROD: Profile = Profile {
    gpu_pools: true,
    secure: true,
};
pub const DEV: Profile = Profile {
    gpu_pools: false,
    secure: false,
};

/// The rendered documents of an overlay, rendered once per test binary; `None` when kubectl is missing and
/// KOSMOS_SKIP_KUBECTL=1.
pub fn rendered(overlay: &str) -> Option<Vec<Value>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Option<Vec<Value>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().expect("cache lock");
    cache
        .entry(overlay.to_string())
        .or_insert_with(|| {
            let yaml = kosmos_manifests::render(overlay).expect("render the overlay")?;
            Some(kosmos_manifests::parse_documents(&yaml).expect("rendered YAML parses"))
        })
        .clone()
}

pub fn catalogue() -> Catalogue {
    Catalogue::load(&kosmos_manifests::repo_root()).expect("docs/metrics.md")
}

pub fn manifests(docs: &[Value]) -> Manifests {
    Manifests::from_documents(docs).expect("typed deserialisation")
}

pub fn object<'a>(docs: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"].as_str().is_some_and(|n| {
                    n == name || (kind == "ConfigMap" && n.starts_with(&format!("{name}-")))
                })
        })
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered overlay"))
}

pub fn remove(docs: &mut Vec<Value>, kind: &str, name: &str) {
    let before = docs.len();
    docs.retain(|d| !(d["kind"] == kind && d["metadata"]["name"] == name));
    assert_eq!(docs.len() + 1, before, "{kind} {name} removed");
}

pub fn container<'a>(docs: &'a mut [Value], deployment: &str) -> &'a mut Value {
    &mut object(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
}

pub fn trigger<'a>(docs: &'a mut [Value], scaled_object: &str, name: &str) -> &'a mut Value {
    object(docs, "ScaledObject", scaled_object)["spec"]["triggers"]
        .as_array_mut()
        .expect("triggers")
        .iter_mut()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no trigger {name}"))
}

pub fn gateway_config(docs: &mut [Value], from: &str, to: &str) {
    let cm = object(docs, "ConfigMap", "kosmos-gateway-config");
    let text = cm["data"]["config.toml"]
        .as_str()
        .expect("config.toml")
        .to_string();
    assert!(text.contains(from), "gateway config contains {from}");
    cm["data"]["config.toml"] = Value::String(text.replace(from, to));
}

/// Runs `mutate` on a copy of `overlay` and asserts that `check` now reports a problem containing `expected`.
pub fn assert_caught(
    overlay: &str,
    mutate: impl FnOnce(&mut Vec<Value>),
    check: impl Fn(&Manifests) -> Vec<String>,
    expected: &str,
) {
    let Some(mut docs) = rendered(overlay) else {
        return;
    };
    let before = check(&manifests(&docs));
    assert!(
        before.is_empty(),
        "the unmutated overlay already fails: {before:#?}"
    );
    mutate(&mut docs);
    let problems = check(&manifests(&docs));
    assert!(
        problems.iter().any(|p| p.contains(expected)),
        "expected a problem containing `{expected}`, got {problems:#?}"
    );
}

pub fn assert_clean(overlay: &str, profile: Profile) {
    let Some(docs) = rendered(overlay) else {
        return;
    };
    let m = manifests(&docs);
    assert_eq!(m.deployments.len(), 3, "three Deployments");
    let problems = m.check_all(&catalogue(), profile);
    assert!(problems.is_empty(), "{overlay}: {problems:#?}");
}
