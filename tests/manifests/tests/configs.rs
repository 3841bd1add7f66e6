//! Every Deployment's configuration — the TOML of its ConfigMap plus the `KOSMOS_<SERVICE>__…` variables of its
//! container — loads with that service's own loader (`deny_unknown_fields`, typed values, validation), so that a
//! misspelled key or a bad value in k8s/ fails here rather than in a crash-looping pod.

use std::path::Path;

use kosmos_manifests::{Manifests, Named};
use kosmos_runtime::cli::ServiceMain;
use kosmos_runtime::config::Layers;

/// The configuration `file` + `env` through service `S`'s own loader.
fn load_as<S: ServiceMain>(file: &Path, env: &[(String, String)]) -> Result<(), String> {
    S::load(&Layers {
        file: Some(file.to_path_buf()),
        env: env.to_vec(),
        env_prefix: S::ENV_PREFIX.into(),
        overrides: Vec::new(),
    })
    .map(drop)
    .map_err(|err| err.to_string())
}

fn load(m: &Manifests, d: &Named<k8s_openapi::api::apps::v1::Deployment>) -> Result<(), String> {
    let (text, env) = m.config_file(d).map_err(|err| format!("{err:#}"))?;
    let dir = std::env::temp_dir().join(format!(
        "kosmos-manifests-{}-{}",
        std::process::id(),
        d.name
    ));
    std::fs::create_dir_all(&dir).map_err(|err| err.to_string())?;
    let file = dir.join("config.toml");
    std::fs::write(&file, text).map_err(|err| err.to_string())?;
    let result = match Manifests::component(d).as_str() {
        "gateway" => load_as::<kosmos_gateway::Gateway>(&file, &env),
        "encoder" => load_as::<kosmos_encoder::Encoder>(&file, &env),
        "decoder" => load_as::<kosmos_decoder::Decoder>(&file, &env),
        other => Err(format!("unknown component `{other}`")),
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn rendered(overlay: &str) -> Option<Vec<serde_json::Value>> {
    let yaml = kosmos_manifests::render(overlay).expect("render the overlay")?;
    Some(kosmos_manifests::parse_documents(&yaml).expect("rendered YAML parses"))
}

#[test]
fn every_service_config_loads_with_the_services_own_loader() {
    for overlay in ["dev", "prod", "prod-hpa"] {
        let Some(docs) = rendered(overlay) else {
            return;
        };
        let m = Manifests::from_documents(&docs).expect("typed deserialisation");
        assert_eq!(m.deployments.len(), 3);
        for d in &m.deployments {
            if let Err(err) = load(&m, d) {
                panic!("{overlay}: {}: {err}", d.name);
            }
        }
    }
}

#[test]
fn a_misspelled_key_or_a_bad_override_is_caught() {
    let Some(mut docs) = rendered("prod") else {
        return;
    };
    let cm = docs
        .iter_mut()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("kosmos-encoder-config-"))
        })
        .expect("encoder ConfigMap");
    let text = cm["data"]["config.toml"]
        .as_str()
        .expect("config.toml")
        .to_string();
    cm["data"]["config.toml"] = text.replace("max_batch_images", "max_batch_image").into();
    let decoder_env = docs
        .iter_mut()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "kosmos-decoder")
        .expect("decoder")["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array_mut()
        .expect("env");
    decoder_env.push(serde_json::json!({"name": "KOSMOS_DECODER__DTYPE", "value": "f64"}));
    let m = Manifests::from_documents(&docs).expect("typed deserialisation");
    let find = |name: &str| m.deployments.iter().find(|d| d.name == name).expect(name);
    let err = load(&m, find("kosmos-encoder")).expect_err("misspelled key");
    assert!(err.contains("max_batch_image"), "{err}");
    let err = load(&m, find("kosmos-decoder")).expect_err("bad dtype");
    assert!(err.contains("dtype"), "{err}");
    assert!(load(&m, find("kosmos-gateway")).is_ok());
}
