//! Generated ids to text, one token at a time: incremental detokenization that never emits a broken UTF-8
//! character, and stop strings that never emit text they would later cut.
//!
//! Detokenization follows TGI's `decode_token`: decode a small window of recent ids twice, without and with the
//! new ids, and emit the difference once it no longer ends in U+FFFD (an incomplete byte-fallback character).
//! Decoding the window rather than the last id alone keeps SentencePiece's word-boundary spaces right, and the
//! concatenation of what is emitted equals decoding all ids at once; [`Detokenizer::finish`] returns whatever
//! that full decode still has beyond the emitted text.

use kosmos_processor::KosmosTokenizer;

/// Incremental detokenizer over one generation's ids (special tokens skipped, as in the final text).
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    emitted: String,
}

impl Detokenizer {
    /// A detokenizer with no ids.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &KosmosTokenizer, id: u32) -> String {
        self.ids.push(id);
        let Ok(prefix_text) =
            tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)
        else {
            return String::new();
        };
        let Ok(new_text) = tokenizer.decode(&self.ids[self.prefix_offset..], true) else {
            return String::new();
        };
        let complete = new_text.len() > prefix_text.len()
            && !new_text.ends_with('\u{FFFD}')
            && new_text.is_char_boundary(prefix_text.len())
            && new_text.starts_with(prefix_text.as_str());
        if !complete {
            return String::new();
        }
        let delta = new_text[prefix_text.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.emitted.push_str(&delta);
        delta
    }

    /// Every id is in: the text a full decode has beyond what was emitted (an incomplete character at the end
    /// comes out as U+FFFD here, as a full decode gives it).
    pub fn finish(&mut self, tokenizer: &KosmosTokenizer) -> String {
        let Ok(full) = tokenizer.decode(&self.ids, true) else {
            return String::new();
        };
        match full.strip_prefix(self.emitted.as_str()) {
            Some(rest) => {
                let rest = rest.to_string();
                self.emitted.push_str(&rest);
                rest
            }
            None => {
                tracing::debug!("incremental detokenization diverged from the full decode");
                String::new()
            }
        }
    }
}

/// What [`StopFilter::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Released {
    /// Text that can go to the client now.
    pub text: String,
    /// A stop string matched: generation must end, and `text` ends right before the match.
    pub stopped: bool,
}

/// Applies stop strings to a stream of text, holding back any suffix that could still become one.
#[derive(Debug)]
pub struct StopFilter {
    stops: Vec<String>,
    longest: usize,
    text: String,
    released: usize,
    stopped: bool,
}

impl StopFilter {
    /// A filter for `stops` (each non-empty).
    pub fn new(stops: Vec<String>) -> Self {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            longest,
            text: String::new(),
            released: 0,
            stopped: false,
        }
    }

    /// All text released so far.
    pub fn released_text(&self) -> &str {
        &self.text[..self.released]
    }

    /// Adds generated text; returns what can be released.
    pub fn push(&mut self, chunk: &str) -> Released {
        if self.stopped {
            return Released {
                text: String::new(),
                stopped: true,
            };
        }
        self.text.push_str(chunk);
        if self.stops.is_empty() {
            return self.release_to(self.text.len(), false);
        }
        // A match can only start in the unreleased text: whatever was released could not begin one.
        let search_from = self.released;
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.text[search_from..].find(stop.as_str()))
            .min();
        if let Some(offset) = earliest {
            self.stopped = true;
            let end = search_from + offset;
            let released = self.release_to(end, true);
            self.text.truncate(end);
            return released;
        }
        let hold = self.held_suffix();
        self.release_to(self.text.len() - hold, false)
    }

    /// Generation ended: everything held back goes out (no stop string can complete any more).
    pub fn flush(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        self.release_to(self.text.len(), false).text
    }

    /// Length of the longest unreleased suffix that is a proper prefix of a stop string.
    fn held_suffix(&self) -> usize {
        let unreleased = &self.text[self.released..];
        let max = unreleased.len().min(self.longest.saturating_sub(1));
        (1..=max)
            .rev()
            .filter(|&len| unreleased.is_char_boundary(unreleased.len() - len))
            .find(|&len| {
                let suffix = &unreleased[unreleased.len() - len..];
                self.stops.iter().any(|stop| stop.starts_with(suffix))
            })
            .unwrap_or(0)
    }

    fn release_to(&mut self, end: usize, stopped: bool) -> Released {
        let end = end.max(self.released);
        let text = self.text[self.released..end].to_string();
        self.released = end;
        Released { text, stopped }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> KosmosTokenizer {
        KosmosTokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/tiny/tokenizer.json"
        ))
        .expect("tiny tokenizer")
    }

    #[test]
    fn incremental_text_equals_the_full_decode() {
        let tokenizer = tokenizer();
        let ids = tokenizer
            .encode("a snowman warming himself by the fire, <phrase>café</phrase> ünïcödé 雪")
            .expect("encode");
        let mut detok = Detokenizer::new();
        let mut text: String = ids.iter().map(|&id| detok.push(&tokenizer, id)).collect();
        text.push_str(&detok.finish(&tokenizer));
        assert_eq!(text, tokenizer.decode(&ids, true).expect("decode"));
    }

    #[test]
    fn special_tokens_add_no_text() {
        let tokenizer = tokenizer();
        let mut detok = Detokenizer::new();
        let eos = tokenizer.eos_id();
        assert_eq!(detok.push(&tokenizer, eos), "");
        assert_eq!(detok.finish(&tokenizer), "");
    }

    #[test]
    fn a_stop_string_cuts_the_text_before_it_even_across_chunks() {
        let mut filter = StopFilter::new(vec!["STOP".into()]);
        let mut out = String::new();
        for chunk in ["hello S", "T", "OP and more"] {
            let released = filter.push(chunk);
            out.push_str(&released.text);
            if released.stopped {
                break;
            }
        }
        assert_eq!(out, "hello ");
        assert_eq!(filter.released_text(), "hello ");
    }

    #[test]
    fn a_held_prefix_that_does_not_complete_is_released() {
        let mut filter = StopFilter::new(vec!["\n\n".into(), "ab".into()]);
        assert_eq!(filter.push("x\n").text, "x");
        assert_eq!(filter.push("y").text, "\ny");
        assert_eq!(filter.push("a").text, "");
        assert_eq!(filter.flush(), "a");
    }

    #[test]
    fn holding_never_splits_a_character() {
        let mut filter = StopFilter::new(vec!["é!".into()]);
        let released = filter.push("café");
        assert_eq!(released.text, "caf");
        let released = filter.push("?");
        assert_eq!(released.text, "é?");
    }

    #[test]
    fn without_stop_strings_everything_goes_out_at_once() {
        let mut filter = StopFilter::new(Vec::new());
        assert_eq!(filter.push("abc").text, "abc");
        assert_eq!(filter.flush(), "");
    }
}
