//! Kosmos-2.5 `<ocr>` output: text lines, each after its box `<bbox><x_X0><y_Y0><x_X1><y_Y1></bbox>`.
//!
//! The reference is the post-processing of the Kosmos-2.5 model card (transformers' `kosmos2_5.md`):
//! `re.split(r"<bbox><x_\d+><y_\d+><x_\d+><y_\d+></bbox>", text)[1:]` gives each box's line (what follows it up to
//! the next box), and coordinates are pixels of the page *as the processor resized it* (its `width` and `height`),
//! scaled to the original image by `original / resized`. Differences, so that nothing is lost:
//! - a line whose box is empty (`x0 >= x1` or `y0 >= y1`) keeps its text with no box (the card drops the line);
//! - text before the first box is returned as a line without a box (the card drops it);
//! - pixel boxes are not truncated to integers, and normalised boxes (`/ resized`, clamped to `[0, 1]`) are given too;
//! - a line's trailing newline is removed (the card prints it).
//!
//! [`OcrStream`] yields the same lines from streamed text as they complete: a line is complete once the next box
//! has been generated, the last one when the stream ends.

use std::sync::LazyLock;

use regex::Regex;

/// One box tag, capturing its four coordinates.
static BOX: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"<bbox><x_(\d+)><y_(\d+)><x_(\d+)><y_(\d+)></bbox>").expect("valid regex")
});

/// One line of an `<ocr>` answer.
#[derive(Debug, Clone, PartialEq)]
pub struct OcrLine {
    /// The line's text (its trailing newline removed).
    pub text: String,
    /// `[x0, y0, x1, y1]` as generated, in pixels of the resized page; `None` for text before any box and for an
    /// empty box.
    pub coords: Option<[u32; 4]>,
}

/// The page's size as the processor resized it and as it was sent, to map boxes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageGeometry {
    /// `(width, height)` after the resize to whole patches (the processor's `width`, `height`).
    pub resized: (u32, u32),
    /// `(width, height)` of the image as sent.
    pub original: (u32, u32),
}

impl OcrLine {
    /// The box normalised by the resized page, `[x0, y0, x1, y1]` in `[0, 1]`.
    pub fn box_normalized(&self, page: PageGeometry) -> Option<[f32; 4]> {
        let [x0, y0, x1, y1] = self.coords?;
        let (width, height) = (page.resized.0.max(1) as f32, page.resized.1.max(1) as f32);
        Some([
            (x0 as f32 / width).min(1.0),
            (y0 as f32 / height).min(1.0),
            (x1 as f32 / width).min(1.0),
            (y1 as f32 / height).min(1.0),
        ])
    }

    /// The box in pixels of the original image: coordinates times `original / resized`, as the model card scales
    /// them (without its truncation to integers).
    pub fn box_px(&self, page: PageGeometry) -> Option<[f32; 4]> {
        let [x0, y0, x1, y1] = self.coords?;
        let scale_x = page.original.0 as f32 / page.resized.0.max(1) as f32;
        let scale_y = page.original.1 as f32 / page.resized.1.max(1) as f32;
        Some([
            x0 as f32 * scale_x,
            y0 as f32 * scale_y,
            x1 as f32 * scale_x,
            y1 as f32 * scale_y,
        ])
    }
}

/// The lines of a whole `<ocr>` answer (the text after the task token).
pub fn parse_ocr(text: &str) -> Vec<OcrLine> {
    let mut stream = OcrStream::default();
    let mut lines = stream.push(text);
    lines.extend(stream.finish());
    lines
}

/// Lines of an `<ocr>` answer as its text streams in.
#[derive(Debug, Default)]
pub struct OcrStream {
    /// Text not yet returned: the current line's box (if any) and everything after it.
    pending: String,
}

impl OcrStream {
    /// Adds generated text; returns the lines it completed.
    pub fn push(&mut self, delta: &str) -> Vec<OcrLine> {
        self.pending.push_str(delta);
        let boxes: Vec<(usize, usize, Option<[u32; 4]>)> = BOX
            .captures_iter(&self.pending)
            .map(|captures| {
                let whole = captures.get(0).expect("group 0");
                (whole.start(), whole.end(), coords(&captures))
            })
            .collect();
        let mut lines = Vec::new();
        // Each box but the last closes the line before it; so does the first box for text before it.
        let mut cut = 0;
        let mut current: Option<(usize, Option<[u32; 4]>)> = None;
        for (start, end, coords) in boxes {
            match current {
                Some((text_start, previous)) => {
                    lines.push(line(&self.pending[text_start..start], previous))
                }
                None if start > 0 => {
                    let before = &self.pending[..start];
                    if !before.trim().is_empty() {
                        lines.push(line(before, None));
                    }
                }
                None => {}
            }
            cut = start;
            current = Some((end, coords.filter(|&[x0, y0, x1, y1]| x0 < x1 && y0 < y1)));
        }
        if current.is_some() {
            self.pending.drain(..cut);
        }
        lines
    }

    /// Ends the stream: the last line, if any (a box cut off by the end of generation is dropped).
    pub fn finish(self) -> Option<OcrLine> {
        let text = self.pending;
        let (start, coords) = match BOX.captures(&text) {
            Some(captures) if captures.get(0).is_some_and(|m| m.start() == 0) => {
                let end = captures.get(0).expect("group 0").end();
                (
                    end,
                    coords(&captures).filter(|&[x0, y0, x1, y1]| x0 < x1 && y0 < y1),
                )
            }
            _ => (0, None),
        };
        let mut body = &text[start..];
        // A box tag the generation did not finish is not text.
        if let Some(open) = body.rfind("<bbox>") {
            body = &body[..open];
        }
        let had_box = start > 0;
        (had_box || !body.trim().is_empty()).then(|| line(body, coords))
    }
}

fn coords(captures: &regex::Captures<'_>) -> Option<[u32; 4]> {
    let value = |index: usize| captures.get(index)?.as_str().parse::<u32>().ok();
    Some([value(1)?, value(2)?, value(3)?, value(4)?])
}

fn line(text: &str, coords: Option<[u32; 4]>) -> OcrLine {
    OcrLine {
        text: text.strip_suffix('\n').unwrap_or(text).to_string(),
        coords,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model card's example answer (a receipt), its first lines.
    const RECEIPT: &str = "<bbox><x_53><y_573><x_69><y_606></bbox>1\n<bbox><x_79><y_573><x_464><y_612></bbox>[REG] \
                           BLACK SAKURA\n<bbox><x_690><y_569><x_810><y_606></bbox>45,455\n";

    #[test]
    fn lines_follow_their_boxes_as_the_model_card_splits_them() {
        let lines = parse_ocr(RECEIPT);
        assert_eq!(
            lines,
            vec![
                OcrLine {
                    text: "1".into(),
                    coords: Some([53, 573, 69, 606])
                },
                OcrLine {
                    text: "[REG] BLACK SAKURA".into(),
                    coords: Some([79, 573, 464, 612])
                },
                OcrLine {
                    text: "45,455".into(),
                    coords: Some([690, 569, 810, 606])
                },
            ]
        );
        // The card's scaling: original / resized (here a page resized from 1000 x 2000 to 864 x 1728).
        let page = PageGeometry {
            resized: (864, 1728),
            original: (1000, 2000),
        };
        let px = lines[0].box_px(page).expect("box");
        assert!((px[0] - 53.0 * 1000.0 / 864.0).abs() < 1e-3, "{px:?}");
        assert_eq!(
            px.map(|v| v as i32),
            [61, 663, 79, 701],
            "the card's int() of the same"
        );
        let normalized = lines[0].box_normalized(page).expect("box");
        assert!((normalized[1] - 573.0 / 1728.0).abs() < 1e-6);
    }

    #[test]
    fn streamed_text_gives_the_same_lines_whatever_the_cuts() {
        let whole = parse_ocr(RECEIPT);
        let chars: Vec<char> = RECEIPT.chars().collect();
        for step in [1, 2, 3, 7, 40] {
            let mut stream = OcrStream::default();
            let mut lines = Vec::new();
            for piece in chars.chunks(step) {
                let piece: String = piece.iter().collect();
                lines.extend(stream.push(&piece));
            }
            // Lines complete as the next box arrives: the first two before the end.
            assert_eq!(lines.len(), 2, "step {step}");
            lines.extend(stream.finish());
            assert_eq!(lines, whole, "step {step}");
        }
    }

    #[test]
    fn empty_boxes_and_text_before_any_box_keep_their_text() {
        let lines = parse_ocr(
            "Title\n<bbox><x_10><y_5><x_10><y_9></bbox>flat\n<bbox><x_1><y_2><x_3><y_4></bbox>ok",
        );
        assert_eq!(
            lines,
            vec![
                OcrLine {
                    text: "Title".into(),
                    coords: None
                },
                OcrLine {
                    text: "flat".into(),
                    coords: None
                },
                OcrLine {
                    text: "ok".into(),
                    coords: Some([1, 2, 3, 4])
                },
            ]
        );
    }

    #[test]
    fn a_box_cut_off_by_the_end_of_generation_is_not_text() {
        let lines = parse_ocr("<bbox><x_1><y_2><x_3><y_4></bbox>last line\n<bbox><x_7");
        assert_eq!(
            lines,
            vec![OcrLine {
                text: "last line".into(),
                coords: Some([1, 2, 3, 4])
            }]
        );
        assert!(parse_ocr("").is_empty());
        assert!(parse_ocr("<bbox><x_7").is_empty());
    }
}
