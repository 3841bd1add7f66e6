//! `kosmos eval`: runs a held-out set (`set.jsonl` + its images, written by `tools/train/run.sh eval --dump`)
//! against a running gateway through the public API and prints the accuracy table, plus how often the answers equal
//! the PyTorch model's (each side with its own image preprocessing).
//!
//! Metrics (the same definitions as `tools/train/eval_torch.py`):
//! * caption: greedy `An image of` → the multiset of (colour, shape) / (word) phrases equals the reference
//!   caption's (every attribute right, in any order);
//! * VQA: greedy `Question: … Answer:` → the answer word, lower-cased, trailing punctuation dropped, equals the truth;
//! * classification: `Score` ranks the candidate labels (mean log-probability per token) → the best is the truth;
//! * grounding: greedy with `grounding` on → for each true object, the first unused entity with its phrase has a
//!   first box with IoU ≥ 0.5 against the true box.
//!
//! A document set (`models/demo-doc/heldout`, Kosmos-2.5's tasks; the same definitions as
//! `tools/train/eval_doc_torch.py`):
//! * `<ocr>` character error rate: the Levenshtein distance between the response's `lines` texts and the true
//!   lines' texts (each joined with `\n`), summed over pages, over the true characters;
//! * line boxes: response lines and true lines paired one to one, highest IoU first (normalised boxes); a true line
//!   counts when its pair has IoU ≥ 0.5;
//! * `<md>` structure: the block kinds in order (`h1`, `h2`, `p`, `li`, `table RxC`) read from the markdown equal
//!   the truth's; and the markdown's character error rate.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use kosmos_proto::v1 as pb;
use serde::Deserialize;
use tokio::task::JoinSet;

use crate::client::{Connection, image_bytes_segment, text_segment};

/// Flags of `kosmos eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    connection: Connection,
    /// The held-out set: a directory with `set.jsonl` and the images it names.
    #[arg(long, value_name = "DIR", default_value = "models/demo/heldout")]
    set: PathBuf,
    /// Evaluate only the first N items.
    #[arg(long)]
    limit: Option<usize>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Most tokens generated per answer [default: 64; 512 for the document tasks `ocr` and `md`, the budget of
    /// the set's PyTorch outputs].
    #[arg(long)]
    max_new_tokens: Option<u32>,
    /// Write every item's answer and verdict here (JSON lines).
    #[arg(long, value_name = "FILE")]
    details: Option<PathBuf>,
}

/// One line of `set.jsonl`.
#[derive(Debug, Clone, Deserialize)]
struct Item {
    id: serde_json::Value,
    image: String,
    task: Task,
    prompt: String,
    #[serde(default)]
    answer: Option<String>,
    #[serde(default)]
    candidates: Vec<String>,
    #[serde(default)]
    label: Option<usize>,
    #[serde(default)]
    objects: Vec<Object>,
    #[serde(default)]
    torch_output: Option<String>,
    #[serde(default)]
    torch_ids: Option<Vec<u32>>,
    /// `ocr`: the page's text lines in reading order.
    #[serde(default)]
    lines: Vec<TruthLine>,
    /// `md`: the page as markdown.
    #[serde(default)]
    markdown: Option<String>,
    /// `md`: the markdown's block kinds in order (see [`md_structure`]).
    #[serde(default)]
    structure: Vec<String>,
    /// `ocr`: the page's size as the processor resized it (the frame of the generated coordinates).
    #[serde(default)]
    #[cfg_attr(not(test), allow(dead_code))]
    resized: Option<[u32; 2]>,
    /// How the Python evaluator scored `torch_output` (a test checks that we score it the same).
    #[serde(default)]
    #[cfg_attr(not(test), allow(dead_code))]
    torch_score: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Deserialize)]
struct TruthLine {
    text: String,
    /// `[x0, y0, x1, y1]` normalised to the page.
    #[serde(rename = "box")]
    bbox: [f32; 4],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Task {
    Caption,
    Vqa,
    Classify,
    Grounding,
    /// Kosmos-2.5 `<ocr>`: text lines with boxes.
    Ocr,
    /// Kosmos-2.5 `<md>`: the page as markdown.
    Md,
}

impl Task {
    fn default_max_new_tokens(self) -> u32 {
        match self {
            Task::Ocr | Task::Md => 512,
            _ => 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Object {
    phrase: String,
    #[serde(rename = "box")]
    bbox: [f32; 4],
}

/// What one item came to.
#[derive(Debug)]
struct Verdict {
    task: Task,
    correct: bool,
    /// Grounding: (objects found with IoU ≥ 0.5, objects); `ocr`: (lines found with IoU ≥ 0.5, lines).
    objects: (usize, usize),
    /// `ocr`, `md`: (character edits, true characters).
    edits: (usize, usize),
    /// Whether the generated ids equal PyTorch's (generation items that carry them).
    agrees: Option<bool>,
    answer: String,
}

/// Runs the set against the gateway and prints the table.
pub async fn run(args: EvalArgs) -> anyhow::Result<()> {
    let items = read_set(&args.set, args.limit)?;
    anyhow::ensure!(
        !items.is_empty(),
        "{} holds no items",
        args.set.join("set.jsonl").display()
    );
    let mut client = args.connection.client().await?;
    // The end-of-sequence id the server's model uses (stripped before comparing ids with PyTorch's).
    let eos_token_id = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .context("GetModelInfo failed")?
        .into_inner()
        .eos_token_id;
    let started = Instant::now();
    let total = items.len();
    let bar = progress_bar(total);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for (index, item) in items.into_iter().enumerate() {
        let image = std::fs::read(args.set.join(&item.image))
            .with_context(|| format!("cannot read {}", args.set.join(&item.image).display()))?;
        let permit = semaphore.clone().acquire_owned().await?;
        let mut client = client.clone();
        let max_new_tokens = args
            .max_new_tokens
            .unwrap_or(item.task.default_max_new_tokens());
        tasks.spawn(async move {
            let verdict = evaluate(&mut client, &item, image, max_new_tokens, eos_token_id).await;
            drop(permit);
            (index, item, verdict)
        });
    }
    let mut verdicts = Vec::with_capacity(total);
    while let Some(joined) = tasks.join_next().await {
        let (index, item, verdict) = joined?;
        let verdict =
            verdict.with_context(|| format!("item {} ({:?}, id {})", index, item.task, item.id))?;
        verdicts.push((index, item, verdict));
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!("  {}/{total} items evaluated", verdicts.len());
    verdicts.sort_by_key(|(index, _, _)| *index);
    if let Some(path) = &args.details {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        );
        for (_, item, verdict) in &verdicts {
            let line = serde_json::json!({
                "id": item.id, "task": format!("{:?}", item.task).to_lowercase(), "prompt": item.prompt,
                "answer": verdict.answer, "correct": verdict.correct, "torch_output": item.torch_output,
                "agrees_with_torch": verdict.agrees,
            });
            writeln!(out, "{line}")?;
        }
    }
    print_table(&verdicts, started.elapsed().as_secs_f64());
    Ok(())
}

fn read_set(dir: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Item>> {
    let path = dir.join("set.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the held-out set {}", path.display()))?;
    let mut items = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: Item = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a held-out item", path.display(), number + 1))?;
        items.push(item);
        if limit.is_some_and(|limit| items.len() >= limit) {
            break;
        }
    }
    Ok(items)
}

/// A progress bar on stderr, drawn only when stderr is a terminal (indicatif hides it otherwise).
fn progress_bar(total: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    let style = indicatif::ProgressStyle::with_template(
        "  [{bar:30}] {pos}/{len} items, {elapsed_precise}",
    )
    .map(|style| style.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

async fn evaluate(
    client: &mut crate::client::Client,
    item: &Item,
    image: Vec<u8>,
    max_new_tokens: u32,
    eos_token_id: u32,
) -> anyhow::Result<Verdict> {
    if item.task == Task::Classify {
        let label = item.label.context("a classify item has no `label`")?;
        let response = client
            .score(pb::ScoreRequest {
                prompt: vec![image_bytes_segment(image), text_segment(&item.prompt)],
                candidates: item.candidates.clone(),
            })
            .await?
            .into_inner();
        let best = response.best_index as usize;
        return Ok(Verdict {
            task: item.task,
            correct: best == label,
            objects: (0, 0),
            edits: (0, 0),
            agrees: None,
            answer: item.candidates.get(best).cloned().unwrap_or_default(),
        });
    }
    // `<grounding>` is the API's `grounding` flag, which puts the tag where Kosmos2Processor does.
    let (grounding, prompt) = match item.prompt.strip_prefix("<grounding>") {
        Some(rest) => (true, rest.trim_start()),
        None => (false, item.prompt.as_str()),
    };
    let response = client
        .generate(pb::GenerateRequest {
            prompt: vec![image_bytes_segment(image), text_segment(prompt)],
            params: Some(pb::GenerationParams {
                max_new_tokens,
                ..Default::default()
            }),
            grounding,
        })
        .await?
        .into_inner();
    let agrees = item.torch_ids.as_ref().map(|torch| {
        let ours: Vec<u32> = response.tokens.iter().map(|token| token.id).collect();
        without_eos(&ours, eos_token_id) == without_eos(torch, eos_token_id)
    });
    let mut edits = (0, 0);
    let (correct, objects) = match item.task {
        Task::Caption => {
            // The truth is the reference caption's phrases (or the objects', when the set lists them).
            let truth = if item.objects.is_empty() {
                caption_attributes(
                    item.answer
                        .as_deref()
                        .context("a caption item has no `answer`")?,
                )
            } else {
                truth_attributes(&item.objects)
            };
            (caption_attributes(&response.text) == truth, (0, 0))
        }
        Task::Vqa => {
            let answer = response
                .text
                .trim()
                .to_lowercase()
                .trim_end_matches(['.', '?', '!'])
                .to_string();
            let truth = item
                .answer
                .as_deref()
                .context("a vqa item has no `answer`")?;
            (answer == truth.trim().to_lowercase(), (0, 0))
        }
        Task::Grounding => {
            let found = grounded(&response.entities, &item.objects);
            (found == item.objects.len(), (found, item.objects.len()))
        }
        Task::Ocr => {
            let truth: Vec<&str> = item.lines.iter().map(|line| line.text.as_str()).collect();
            let ours: Vec<&str> = response
                .lines
                .iter()
                .map(|line| line.text.as_str())
                .collect();
            let truth = truth.join("\n");
            edits = (levenshtein(&ours.join("\n"), &truth), truth.chars().count());
            let boxes: Vec<Option<[f32; 4]>> = response
                .lines
                .iter()
                .map(|line| line.r#box.as_ref().map(|b| [b.x1, b.y1, b.x2, b.y2]))
                .collect();
            let truth_boxes: Vec<[f32; 4]> = item.lines.iter().map(|line| line.bbox).collect();
            let found = matched_lines(&boxes, &truth_boxes);
            (
                edits.0 == 0 && found == truth_boxes.len(),
                (found, truth_boxes.len()),
            )
        }
        Task::Md => {
            let truth = item
                .markdown
                .as_deref()
                .context("an md item has no `markdown`")?;
            edits = (
                levenshtein(response.text.trim(), truth),
                truth.chars().count(),
            );
            (md_structure(&response.text) == item.structure, (0, 0))
        }
        Task::Classify => unreachable!("answered above"),
    };
    Ok(Verdict {
        task: item.task,
        correct,
        objects,
        edits,
        agrees,
        answer: if grounding {
            response.clean_text
        } else {
            response.text
        },
    })
}

/// The ids without a final end-of-sequence (HF's `generate` keeps it; the API reports it as a special token).
fn without_eos(ids: &[u32], eos_token_id: u32) -> &[u32] {
    ids.strip_suffix(&[eos_token_id]).unwrap_or(ids)
}

/// The (colour, shape) and (word) phrases of a caption, sorted: `a red circle` → (red, circle), `the word cat` →
/// (word, cat).
fn caption_attributes(text: &str) -> Vec<(String, String)> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i + 2 < words.len() {
        match (words[i].as_str(), words[i + 1].as_str()) {
            ("the", "word") => {
                found.push(("word".to_string(), words[i + 2].clone()));
                i += 3;
            }
            ("a" | "an", _) => {
                found.push((words[i + 1].clone(), words[i + 2].clone()));
                i += 3;
            }
            _ => i += 1,
        }
    }
    found.sort();
    found
}

fn truth_attributes(objects: &[Object]) -> Vec<(String, String)> {
    let mut truth: Vec<_> = objects
        .iter()
        .flat_map(|object| caption_attributes(&object.phrase))
        .collect();
    truth.sort();
    truth
}

fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Edit distance in characters (insertions, deletions, substitutions).
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            current[j + 1] = (previous[j + 1] + 1)
                .min(current[j] + 1)
                .min(previous[j] + usize::from(ca != *cb));
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// True boxes paired one to one with predicted boxes (those that have one), highest IoU first, with IoU ≥ 0.5.
fn matched_lines(predicted: &[Option<[f32; 4]>], truth: &[[f32; 4]]) -> usize {
    let mut pairs: Vec<(f32, usize, usize)> = predicted
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.map(|b| (i, b)))
        .flat_map(|(i, p)| {
            truth
                .iter()
                .enumerate()
                .map(move |(j, t)| (iou(p, *t), i, j))
        })
        .filter(|(value, _, _)| *value >= 0.5)
        .collect();
    // Highest IoU first, ties broken as the Python reference's reversed tuple sort breaks them.
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    let (mut used_predicted, mut used_truth) =
        (vec![false; predicted.len()], vec![false; truth.len()]);
    let mut found = 0;
    for (_, i, j) in pairs {
        if used_predicted[i] || used_truth[j] {
            continue;
        }
        used_predicted[i] = true;
        used_truth[j] = true;
        found += 1;
    }
    found
}

/// The block kinds of a markdown page in order: `# ` → `h1`, `## ` → `h2`, `- ` or `N. ` → `li`, a run of lines
/// starting with `|` → `table RxC` (R rows without the `| --- |` rule, C the first row's cells), any other
/// non-empty line → `p`.
fn md_structure(text: &str) -> Vec<String> {
    fn flush(table: &mut Vec<&str>, kinds: &mut Vec<String>) {
        if let Some(first) = table.first() {
            let rows = table
                .iter()
                .filter(|row| !row.chars().all(|c| matches!(c, '|' | '-' | ':' | ' ')))
                .count();
            let cols = first.trim_matches('|').split('|').count();
            kinds.push(format!("table {rows}x{cols}"));
            table.clear();
        }
    }
    let mut kinds = Vec::new();
    let mut table = Vec::new();
    for line in text.split('\n').map(str::trim) {
        if line.starts_with('|') {
            table.push(line);
            continue;
        }
        flush(&mut table, &mut kinds);
        if line.is_empty() {
            continue;
        }
        let numbered = line
            .split_once(". ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        kinds.push(
            if line.starts_with("## ") {
                "h2"
            } else if line.starts_with("# ") {
                "h1"
            } else if line.starts_with("- ") || numbered {
                "li"
            } else {
                "p"
            }
            .to_string(),
        );
    }
    flush(&mut table, &mut kinds);
    kinds
}

/// True objects whose phrase has an entity (the first unused one with that phrase) whose first box overlaps the
/// true box with IoU ≥ 0.5.
fn grounded(entities: &[pb::Entity], objects: &[Object]) -> usize {
    let mut used = vec![false; entities.len()];
    let mut found = 0;
    for object in objects {
        let Some(index) = (0..entities.len()).find(|&j| {
            !used[j]
                && entities[j].phrase.trim() == object.phrase.trim()
                && !entities[j].boxes.is_empty()
        }) else {
            continue;
        };
        used[index] = true;
        let b = &entities[index].boxes[0];
        if iou([b.x1, b.y1, b.x2, b.y2], object.bbox) >= 0.5 {
            found += 1;
        }
    }
    found
}

fn print_table(verdicts: &[(usize, Item, Verdict)], seconds: f64) {
    #[derive(Default)]
    struct Row {
        correct: usize,
        total: usize,
    }
    let mut rows: BTreeMap<&str, Row> = BTreeMap::new();
    let mut add = |name: &'static str, correct: bool| {
        let row = rows.entry(name).or_default();
        row.correct += usize::from(correct);
        row.total += 1;
    };
    let (mut agree, mut compared) = (0, 0);
    let (mut objects_found, mut objects) = (0, 0);
    let (mut lines_found, mut lines) = (0, 0);
    let (mut ocr_edits, mut md_edits) = ((0, 0), (0, 0));
    for (_, _, verdict) in verdicts {
        match verdict.task {
            Task::Caption => add("caption", verdict.correct),
            Task::Vqa => add("vqa", verdict.correct),
            Task::Classify => add("classification (Score)", verdict.correct),
            Task::Grounding => add("grounding (all objects of an image)", verdict.correct),
            Task::Ocr => add("ocr (every line's text and box right)", verdict.correct),
            Task::Md => add("md structure (pages)", verdict.correct),
        }
        match verdict.task {
            Task::Ocr => {
                ocr_edits = (ocr_edits.0 + verdict.edits.0, ocr_edits.1 + verdict.edits.1);
                lines_found += verdict.objects.0;
                lines += verdict.objects.1;
            }
            Task::Md => md_edits = (md_edits.0 + verdict.edits.0, md_edits.1 + verdict.edits.1),
            _ => {
                objects_found += verdict.objects.0;
                objects += verdict.objects.1;
            }
        }
        if let Some(agrees) = verdict.agrees {
            compared += 1;
            agree += usize::from(agrees);
        }
    }
    println!("| metric | correct | total | accuracy |");
    println!("|---|---:|---:|---:|");
    let line = |name: &str, correct: usize, total: usize| {
        let accuracy = if total == 0 {
            0.0
        } else {
            100.0 * correct as f64 / total as f64
        };
        println!("| {name} | {correct} | {total} | {accuracy:.1}% |");
    };
    for (name, row) in &rows {
        line(name, row.correct, row.total);
    }
    if objects > 0 {
        line("grounding IoU@0.5 (objects)", objects_found, objects);
    }
    if lines > 0 {
        line("ocr line boxes IoU@0.5 (lines)", lines_found, lines);
    }
    // Error rates: the edits in the second column, the true characters in the third.
    for (name, (edits, chars)) in [
        ("ocr character error rate (edits, chars)", ocr_edits),
        ("md character error rate (edits, chars)", md_edits),
    ] {
        if chars > 0 {
            line(name, edits, chars);
        }
    }
    if compared > 0 {
        line("same ids as PyTorch (own preprocessing)", agree, compared);
    }
    println!(
        "\n{} items in {seconds:.1} s through the public API",
        verdicts.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_phrases_are_read_as_the_reference_reads_them() {
        assert_eq!(
            caption_attributes(" a red circle and an orange star."),
            vec![
                ("orange".into(), "star".into()),
                ("red".into(), "circle".into())
            ]
        );
        assert_eq!(
            caption_attributes(" the word cat."),
            vec![("word".into(), "cat".into())]
        );
        assert!(caption_attributes(" nothing here").is_empty());
    }

    #[test]
    fn document_scores_are_the_references() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("naïve", "naive"), 1);
        let table = "# Title\n\n| A | B |\n| --- | --- |\n| 1 | 2 |\n\n- x\n12. y\n12.50 z\n## End";
        assert_eq!(
            md_structure(table),
            ["h1", "table 2x2", "li", "li", "p", "h2"]
        );
        let truth = [[0.0, 0.0, 0.5, 0.1], [0.0, 0.2, 0.5, 0.3]];
        // One prediction can pair with one true line only; a box-less line pairs with none.
        assert_eq!(
            matched_lines(&[Some([0.0, 0.0, 0.5, 0.12]), None], &truth),
            1
        );
        assert_eq!(
            matched_lines(
                &[Some([0.0, 0.0, 0.5, 0.1]), Some([0.0, 0.2, 0.5, 0.3])],
                &truth
            ),
            2
        );
    }

    /// The shipped document held-out set carries PyTorch's answers with the scores the Python evaluator gave
    /// them (`tools/train/eval_doc_torch.py`); ours of the same texts must be the same.
    #[test]
    fn scores_pytorchs_document_answers_as_the_python_evaluator_does() {
        use kosmos_processor::{PageGeometry, parse_ocr};

        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/demo-doc/heldout");
        let items = read_set(&dir, None).expect("the document held-out set");
        assert!(items.len() >= 100, "{} items", items.len());
        for item in &items {
            let output = item.torch_output.as_deref().expect("torch_output");
            let score = item.torch_score.as_ref().expect("torch_score");
            match item.task {
                Task::Ocr => {
                    let resized = item.resized.expect("resized");
                    let page = PageGeometry {
                        resized: (resized[0], resized[1]),
                        original: (resized[0], resized[1]),
                    };
                    let lines = parse_ocr(output);
                    let ours: Vec<&str> = lines.iter().map(|line| line.text.as_str()).collect();
                    let truth: Vec<&str> =
                        item.lines.iter().map(|line| line.text.as_str()).collect();
                    assert_eq!(
                        levenshtein(&ours.join("\n"), &truth.join("\n")),
                        score["edits"].as_u64().expect("torch_score.edits") as usize,
                        "{:?}",
                        item.id
                    );
                    let boxes: Vec<_> =
                        lines.iter().map(|line| line.box_normalized(page)).collect();
                    let truth: Vec<_> = item.lines.iter().map(|line| line.bbox).collect();
                    assert_eq!(
                        matched_lines(&boxes, &truth),
                        score["lines_found"]
                            .as_u64()
                            .expect("torch_score.lines_found") as usize,
                        "{:?}",
                        item.id
                    );
                }
                Task::Md => {
                    let truth = item.markdown.as_deref().expect("markdown");
                    assert_eq!(
                        levenshtein(output.trim(), truth),
                        score["edits"].as_u64().expect("torch_score.edits") as usize,
                        "{:?}",
                        item.id
                    );
                    assert_eq!(
                        md_structure(output) == item.structure,
                        score["structure_right"]
                            .as_bool()
                            .expect("torch_score.structure_right"),
                        "{:?}",
                        item.id
                    );
                }
                other => panic!("a document set holds {other:?}"),
            }
        }
    }

    #[test]
    fn grounding_needs_the_phrase_and_half_the_box() {
        let entity = |phrase: &str, b: [f32; 4]| pb::Entity {
            phrase: phrase.into(),
            span: None,
            boxes: vec![pb::Box {
                x1: b[0],
                y1: b[1],
                x2: b[2],
                y2: b[3],
            }],
        };
        let truth = vec![Object {
            phrase: "a red circle".into(),
            bbox: [0.1, 0.1, 0.5, 0.5],
        }];
        assert_eq!(
            grounded(&[entity("a red circle", [0.1, 0.1, 0.5, 0.5])], &truth),
            1
        );
        assert_eq!(
            grounded(&[entity("a red circle", [0.5, 0.5, 0.9, 0.9])], &truth),
            0
        );
        assert_eq!(
            grounded(&[entity("a blue circle", [0.1, 0.1, 0.5, 0.5])], &truth),
            0
        );
        assert!((iou([0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]) - 0.5).abs() < 1e-6);
    }
}
