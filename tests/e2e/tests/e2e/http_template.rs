//! A model directory that carries a chat template: `/v1/chat/completions` renders the conversation with it, the
//! images where the template puts their messages' content, and a conversation the template refuses is a 400.

use kosmos_e2e::http::call;
use kosmos_e2e::{fixture_image, image, text, tiny_model_dir};
use serde_json::json;

use crate::http_api::{data_uri, http_cluster};
use crate::{IMAGE, greedy_request};

/// Roles in capitals, one line per message, the reply after `ASSISTANT:`; a conversation must end with the user.
const TEMPLATE: &str = "{{ bos_token }}{% if messages[-1]['role'] != 'user' %}\
{{ raise_exception('the last message must be the user\\'s') }}{% endif %}\
{% for message in messages %}{{ message['role'] | upper }}: {{ message['content'].strip() }}\n{% endfor %}\
{% if add_generation_prompt %}ASSISTANT:{% endif %}";

/// A model directory for the gateway alone: the tiny model's tokenizer and [`TEMPLATE`]; removed on drop.
struct TemplatedModel(std::path::PathBuf);

impl TemplatedModel {
    fn create() -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("kosmos-e2e-chat-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(
            tiny_model_dir().join("tokenizer.json"),
            dir.join("tokenizer.json"),
        )?;
        std::fs::write(dir.join("chat_template.jinja"), TEMPLATE)?;
        Ok(Self(dir))
    }
}

impl Drop for TemplatedModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_directorys_chat_template_renders_the_conversation() -> anyhow::Result<()> {
    let model = TemplatedModel::create()?;
    let model_dir = format!("model_dir=\"{}\"", model.0.display());
    let (cluster, addr) = http_cluster(&[model_dir.as_str()]).await?;
    let png = fixture_image(IMAGE);
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(&png)}},
            {"type": "text", "text": "What is this?"},
        ]},
    ]);
    let body = json!({"messages": messages, "max_tokens": 12, "no_repeat_ngram_size": 3});
    let chat = call(addr, "/v1/chat/completions", Some(&body))
        .await?
        .ok_json()?;
    // What the template renders ("<s>" dropped: the prompt builder adds it), cut at the image.
    let mut client = cluster.client().await?;
    let grpc = client
        .generate(greedy_request(
            vec![
                text("SYSTEM: Be brief.\nUSER: "),
                image(png.clone()),
                text(" What is this?\nASSISTANT:"),
            ],
            12,
        ))
        .await?
        .into_inner();
    assert_eq!(chat["choices"][0]["message"]["content"], grpc.text.as_str());
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        grpc.usage.unwrap_or_default().prompt_tokens,
        "the same prompt"
    );
    // Without the template the roles would not be rendered: a different prompt.
    let plain = client
        .generate(greedy_request(
            vec![text("Be brief."), image(png), text("What is this?")],
            12,
        ))
        .await?
        .into_inner();
    assert_ne!(
        plain.usage.unwrap_or_default().prompt_tokens,
        grpc.usage.unwrap_or_default().prompt_tokens
    );
    // A conversation the template refuses is the caller's error, in the template's words.
    let body = json!({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]});
    let refused = call(addr, "/v1/chat/completions", Some(&body)).await?;
    assert_eq!(refused.status, 400);
    let message = refused.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("chat template refuses")
            && message.contains("the last message must be the user's"),
        "{message}"
    );
    // U+FFFC in a caller's text would be taken for an image: refused by name.
    let body = json!({"messages": [{"role": "user", "content": "a \u{FFFC} b"}]});
    let refused = call(addr, "/v1/chat/completions", Some(&body)).await?;
    assert_eq!(refused.status, 400);
    let message = refused.json()?["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("`messages[0].content`"), "{message}");
    cluster.shutdown().await;
    Ok(())
}
