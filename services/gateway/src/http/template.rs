//! A model directory's chat template, rendered as Hugging Face renders it, for `/v1/chat/completions`.
//!
//! The template comes from `chat_template.jinja`, else from `chat_template` in `tokenizer_config.json` (a string,
//! or a list of `{name, template}` of which `default` is taken). It is compiled once at start-up with what
//! transformers' `render_jinja_template` sets up: `trim_blocks` and `lstrip_blocks`, loop controls, Python's string
//! and dict methods (minijinja-contrib's `pycompat`), `raise_exception(message)`, and a `tojson` filter that writes
//! what Python's `json.dumps(ensure_ascii=False)` writes (`", "` and `": "` separators, `indent` honoured). A render
//! gets `messages`, `add_generation_prompt` (true: the reply follows) and the tokenizer's special tokens
//! (`bos_token`, `eos_token`, `pad_token`, `unk_token`), and is bounded by fuel (a template cannot loop for ever).
//!
//! **Images.** KOSMOS places an image anywhere in the prompt, so every message's content is passed as a string in
//! which each image is one U+FFFC (OBJECT REPLACEMENT CHARACTER) at its place; the rendered text is cut at those
//! characters into the prompt's text segments, and the images go between them in order. A template that drops or
//! repeats a message's content so that the count differs is refused by name. The rendered text's leading
//! `bos_token` is removed: the prompt builder starts every prompt with it, as `Kosmos2Processor` does.
//!
//! Parity with transformers 5.23 (Jinja2 3.1.6) is tested against `tests/fixtures/chat_templates.json`, written by
//! `tools/reference/run.sh chat-templates`.

use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// The character that stands for an image in a rendered conversation.
pub const IMAGE_MARKER: char = '\u{FFFC}';

/// The template's name inside its environment.
const NAME: &str = "chat_template";

/// Most template instructions one render may run (a render of a long conversation takes tens of thousands).
const FUEL: u64 = 5_000_000;

/// A chat template that could not be loaded: the service does not start.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The file could not be read or parsed.
    #[error("reading the chat template in {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The template does not compile.
    #[error("the chat template in {path} does not compile: {source:#}")]
    Compile {
        /// The file.
        path: PathBuf,
        /// minijinja's error (with the line).
        source: Error,
    },
}

/// Why one render failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The template refused the conversation (`raise_exception`, e.g. roles that do not alternate): the
    /// caller's to fix.
    #[error("the model's chat template refuses these `messages`: {0}")]
    Refused(String),
    /// The rendered text holds more or fewer images than the messages.
    #[error("the model's chat template rendered {rendered} images of the {sent} in `messages`")]
    ImageCount {
        /// Images in the messages.
        sent: usize,
        /// Image markers in the rendered text.
        rendered: usize,
    },
    /// The template failed otherwise (an unknown function, running out of fuel): the deployment's to fix.
    #[error("the model's chat template failed: {0}")]
    Failed(String),
}

/// One message as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TemplateMessage {
    /// `system`, `user`, …
    pub role: String,
    /// The message's text, with [`IMAGE_MARKER`] where each image goes.
    pub content: String,
}

/// A piece of the rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    /// Text (never empty).
    Text(String),
    /// The next image of the messages, in order.
    Image,
}

/// The tokenizer's special tokens, as templates name them (an absent one is undefined, as in transformers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SpecialTokens {
    /// Beginning of sequence (`<s>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<String>,
    /// End of sequence (`</s>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    /// Padding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_token: Option<String>,
    /// Unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unk_token: Option<String>,
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: SpecialTokens,
    /// Where it was read from (for logs).
    pub path: PathBuf,
}

impl ChatTemplate {
    /// The chat template of `model_dir`, if it carries one, compiled.
    pub fn load(model_dir: &Path, tokens: SpecialTokens) -> Result<Option<Self>, TemplateError> {
        let Some((path, source)) = find(model_dir)? else {
            return Ok(None);
        };
        Self::compile(path, source, tokens).map(Some)
    }

    /// Compiles `source` (read from `path`).
    pub fn compile(
        path: PathBuf,
        source: String,
        tokens: SpecialTokens,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|source| TemplateError::Compile {
                path: path.clone(),
                source,
            })?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source)
            .map_err(|source| TemplateError::Compile {
                path: path.clone(),
                source,
            })?;
        Ok(Self { env, tokens, path })
    }

    /// The conversation as the template renders it, with the reply to follow (`add_generation_prompt`).
    pub fn render_text(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
    ) -> Result<String, RenderError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|err| RenderError::Failed(format!("{err:#}")))?;
        let context = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            ..Value::from(minijinja::value::Serde(&self.tokens))
        };
        template.render(context).map_err(|err| match err.kind() {
            ErrorKind::InvalidOperation if is_raised(&err) => RenderError::Refused(
                err.detail()
                    .unwrap_or_default()
                    .trim_start_matches(RAISED)
                    .to_string(),
            ),
            _ => RenderError::Failed(format!("{err:#}")),
        })
    }

    /// The conversation cut into text and images (see the module doc); `images` is how many the messages hold.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        images: usize,
    ) -> Result<Vec<Rendered>, RenderError> {
        let text = self.render_text(messages, true)?;
        let text = match &self.tokens.bos_token {
            Some(bos) if !bos.is_empty() => text.strip_prefix(bos.as_str()).unwrap_or(&text),
            _ => &text,
        };
        let rendered = text.matches(IMAGE_MARKER).count();
        if rendered != images {
            return Err(RenderError::ImageCount {
                sent: images,
                rendered,
            });
        }
        let mut pieces = Vec::new();
        for (index, piece) in text.split(IMAGE_MARKER).enumerate() {
            if index > 0 {
                pieces.push(Rendered::Image);
            }
            if !piece.is_empty() {
                pieces.push(Rendered::Text(piece.to_string()));
            }
        }
        Ok(pieces)
    }
}

/// The template file of `model_dir` and its source, if any.
fn find(model_dir: &Path) -> Result<Option<(PathBuf, String)>, TemplateError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|err| TemplateError::Read {
            path: path.to_path_buf(),
            message: err.to_string(),
        })
    };
    let jinja = model_dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some((jinja.clone(), read(&jinja)?)));
    }
    let config = model_dir.join("tokenizer_config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_str(&read(&config)?).map_err(|err| TemplateError::Read {
            path: config.clone(),
            message: err.to_string(),
        })?;
    let source = match value.get("chat_template") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(source)) => source.clone(),
        // Several named templates: the default one.
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|entry| entry.get("template")?.as_str().map(str::to_string))
            .ok_or_else(|| TemplateError::Read {
                path: config.clone(),
                message: "`chat_template` lists named templates but none named `default`".into(),
            })?,
        Some(other) => {
            return Err(TemplateError::Read {
                path: config.clone(),
                message: format!("`chat_template` must be a string, got {other}"),
            });
        }
    };
    Ok(Some((config, source)))
}

/// The prefix of a `raise_exception` error's detail, to tell it from the template's own failures.
const RAISED: &str = "raised by the template: ";

/// `raise_exception(message)`: the template refuses the conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

fn is_raised(err: &Error) -> bool {
    err.detail()
        .is_some_and(|detail| detail.starts_with(RAISED))
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: `separators` must be a pair",
            ));
        }
        // Python's defaults: ", " without indent, "," with one (a newline follows).
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = PyJson {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` layout.
struct PyJson {
    indent: Option<usize>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl PyJson {
    /// Writes `value` (maps in their insertion order, as Python's dicts).
    fn write(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        let not_json = |err: serde_json::Error| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: not serialisable: {err}"),
            )
        };
        match value.kind() {
            minijinja::value::ValueKind::Seq | minijinja::value::ValueKind::Iterable
                if value.len().is_some_and(|len| len > 0) =>
            {
                out.push('[');
                for (index, item) in value.try_iter()?.enumerate() {
                    self.separate(index, depth + 1, out);
                    self.write(&item, depth + 1, out)?;
                }
                self.close(depth, out);
                out.push(']');
            }
            minijinja::value::ValueKind::Map if value.len().is_some_and(|len| len > 0) => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (index, key) in keys.iter().enumerate() {
                    self.separate(index, depth + 1, out);
                    let name = match key.as_str() {
                        Some(name) => name.to_string(),
                        None => key.to_string(),
                    };
                    out.push_str(&serde_json::to_string(&name).map_err(not_json)?);
                    out.push_str(&self.key);
                    self.write(&value.get_item(key)?, depth + 1, out)?;
                }
                self.close(depth, out);
                out.push('}');
            }
            minijinja::value::ValueKind::Undefined => out.push_str("null"),
            // Scalars, `[]` and `{}` as serde_json writes them (the same escapes as Python's, non-ASCII kept).
            _ => out.push_str(&serde_json::to_string(value).map_err(not_json)?),
        }
        Ok(())
    }

    /// Before the `index`-th item at `depth`.
    fn separate(&self, index: usize, depth: usize, out: &mut String) {
        if index > 0 {
            out.push_str(&self.item);
        }
        if let Some(indent) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
    }

    /// Before the closing bracket of a container at `depth`.
    fn close(&self, depth: usize, out: &mut String) {
        if let Some(indent) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> SpecialTokens {
        SpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            pad_token: None,
            unk_token: None,
        }
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::compile("test.jinja".into(), source.into(), tokens()).expect("compiles")
    }

    fn message(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn images_cut_the_rendered_text_and_the_leading_bos_goes() {
        let chat = template(
            "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
             {% if add_generation_prompt %}assistant:{% endif %}",
        );
        let marker = IMAGE_MARKER.to_string();
        let pieces = chat
            .render(
                &[message("user", &format!("{marker} What is it? {marker}"))],
                2,
            )
            .expect("renders");
        assert_eq!(
            pieces,
            vec![
                Rendered::Text("user: ".into()),
                Rendered::Image,
                Rendered::Text(" What is it? ".into()),
                Rendered::Image,
                Rendered::Text("\nassistant:".into()),
            ]
        );
        let err = chat
            .render(&[message("user", "no image here")], 1)
            .expect_err("an image went missing");
        assert_eq!(
            err,
            RenderError::ImageCount {
                sent: 1,
                rendered: 0
            }
        );
    }

    #[test]
    fn raise_exception_is_the_callers_error_and_other_failures_the_templates() {
        let chat = template(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
        );
        assert_eq!(
            chat.render_text(&[message("assistant", "hi")], true),
            Err(RenderError::Refused("first must be user".into()))
        );
        let broken = template("{{ undefined_function() }}");
        assert!(matches!(
            broken.render_text(&[message("user", "hi")], true),
            Err(RenderError::Failed(_))
        ));
        // Fuel bounds a runaway template.
        let runaway = template(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        );
        assert!(matches!(
            runaway.render_text(&[], true),
            Err(RenderError::Failed(message)) if message.contains("fuel")
        ));
    }

    #[test]
    fn a_template_that_does_not_compile_is_named_at_load() {
        let err = ChatTemplate::compile("bad.jinja".into(), "{% for %}".into(), tokens())
            .expect_err("syntax error");
        assert!(err.to_string().contains("bad.jinja"), "{err}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let chat = template(
            "{{ {'b': 1, 'a': [1, 'x'], 'é': none} | tojson }}|{{ {'b': 1, 'a': 2} | tojson(indent=2) }}|\
             {{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|{{ [] | tojson }}",
        );
        assert_eq!(
            chat.render_text(&[], false).expect("renders"),
            "{\"b\": 1, \"a\": [1, \"x\"], \"é\": null}|{\n  \"b\": 1,\n  \"a\": 2\n}|{\"a\": 2, \"b\": 1}|[]"
        );
    }

    #[test]
    fn a_model_directory_without_a_template_has_none() {
        let dir = std::env::temp_dir().join(format!("kosmos-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert!(ChatTemplate::load(&dir, tokens()).expect("loads").is_none());
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ messages[0].content }}"}]}"#,
        )
        .expect("write");
        let chat = ChatTemplate::load(&dir, tokens())
            .expect("loads")
            .expect("a template");
        assert_eq!(
            chat.render_text(&[message("user", "hi")], true).as_deref(),
            Ok("hi")
        );
        std::fs::write(dir.join("chat_template.jinja"), "J{{ messages | length }}").expect("write");
        let chat = ChatTemplate::load(&dir, tokens())
            .expect("loads")
            .expect("a template");
        assert_eq!(
            chat.render_text(&[], true).as_deref(),
            Ok("J0"),
            "the .jinja file wins"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// One case of `tests/fixtures/chat_templates.json`.
    #[derive(serde::Deserialize)]
    struct ReferenceCase {
        name: String,
        template: String,
        messages: Vec<TemplateMessage>,
        add_generation_prompt: bool,
        rendered: Option<String>,
        error: Option<String>,
    }

    #[derive(serde::Deserialize)]
    struct ReferenceFixture {
        special_tokens: SpecialTokens,
        cases: Vec<ReferenceCase>,
    }

    /// Every case transformers rendered (tools/reference/make_chat_template_fixtures.py): the same text, or the
    /// same `raise_exception` message as a refusal.
    #[test]
    fn templates_render_what_transformers_renders() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat_templates.json");
        let fixture: ReferenceFixture = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("{}: {err}", path.display())),
        )
        .expect("fixture parses");
        assert!(fixture.cases.len() >= 50, "{} cases", fixture.cases.len());
        let mut refused = 0;
        for case in &fixture.cases {
            let chat = ChatTemplate::compile(
                case.name.clone().into(),
                case.template.clone(),
                fixture.special_tokens.clone(),
            )
            .unwrap_or_else(|err| panic!("{}: {err}", case.name));
            let got = chat.render_text(&case.messages, case.add_generation_prompt);
            match (&case.rendered, &case.error) {
                (Some(rendered), None) => {
                    assert_eq!(got.as_ref(), Ok(rendered), "{}", case.name);
                }
                (None, Some(error)) => {
                    refused += 1;
                    assert_eq!(
                        got,
                        Err(RenderError::Refused(error.clone())),
                        "{}",
                        case.name
                    );
                }
                _ => panic!("{}: a case has either `rendered` or `error`", case.name),
            }
        }
        assert!(refused > 0, "the fixture exercises raise_exception");
    }
}
