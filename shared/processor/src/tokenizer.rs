//! The Kosmos tokenizer: a `tokenizer.json` (XLM-R SentencePiece for the real checkpoints) plus the
//! Kosmos-2 tag tokens, configured exactly as HF's `Kosmos2Processor.__init__` configures them.
//!
//! `Kosmos2Processor.__init__` re-adds the 11 tag tokens and the patch index tokens as
//! `AddedToken(lstrip=True, rstrip=False, normalized=False)`, non-special. Loading here does the same,
//! whatever flags `tokenizer.json` stored, so that whitespace before a tag is absorbed into the tag as in
//! HF. The tokens must already be in the vocabulary: adding them would create ids the model never saw.

use std::path::Path;

use tokenizers::{AddedToken, Tokenizer};

use crate::error::TokenizerError;

/// The Kosmos-2 tag tokens, in HF's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tag {
    /// `</doc>`.
    EndOfDocument,
    /// `<image>`: opens an image block.
    BeginImage,
    /// `</image>`: closes an image block.
    EndImage,
    /// `</chunk>`.
    EndOfChunk,
    /// `</line>`.
    EndOfLine,
    /// `<phrase>`.
    BeginPhrase,
    /// `</phrase>`.
    EndPhrase,
    /// `<object>`.
    BeginObject,
    /// `</object>`.
    EndObject,
    /// `</delimiter_of_multi_objects/>`.
    ObjectDelimiter,
    /// `<grounding>`: asks the model to ground phrases.
    Grounding,
}

impl Tag {
    /// Every tag, in HF's order.
    pub const ALL: [Tag; 11] = [
        Tag::EndOfDocument,
        Tag::BeginImage,
        Tag::EndImage,
        Tag::EndOfChunk,
        Tag::EndOfLine,
        Tag::BeginPhrase,
        Tag::EndPhrase,
        Tag::BeginObject,
        Tag::EndObject,
        Tag::ObjectDelimiter,
        Tag::Grounding,
    ];

    /// The token text.
    pub fn as_str(self) -> &'static str {
        match self {
            Tag::EndOfDocument => "</doc>",
            Tag::BeginImage => "<image>",
            Tag::EndImage => "</image>",
            Tag::EndOfChunk => "</chunk>",
            Tag::EndOfLine => "</line>",
            Tag::BeginPhrase => "<phrase>",
            Tag::EndPhrase => "</phrase>",
            Tag::BeginObject => "<object>",
            Tag::EndObject => "</object>",
            Tag::ObjectDelimiter => "</delimiter_of_multi_objects/>",
            Tag::Grounding => "<grounding>",
        }
    }

    /// The tag whose token text is `token`, if any.
    pub fn from_token(token: &str) -> Option<Tag> {
        Tag::ALL.into_iter().find(|tag| tag.as_str() == token)
    }
}

/// Number of patch index tokens of Kosmos-2 (a 32 x 32 grid).
pub const NUM_PATCH_INDEX_TOKENS: u32 = 1024;

/// The text of patch index token `index`: `<patch_index_0044>` (zero-padded to 4 digits, like HF's
/// `str(index).zfill(4)`).
pub fn patch_index_token(index: u32) -> String {
    format!("<patch_index_{index:04}>")
}

/// Ids of the sentence-level special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokenIds {
    /// `<s>`.
    pub bos: u32,
    /// `<pad>`.
    pub pad: u32,
    /// `</s>`.
    pub eos: u32,
    /// `<unk>`.
    pub unk: u32,
}

/// A `tokenizers::Tokenizer` with the Kosmos token lookups resolved once.
#[derive(Debug, Clone)]
pub struct KosmosTokenizer {
    inner: Tokenizer,
    special: SpecialTokenIds,
    tag_ids: [Option<u32>; 11],
    /// Id of `<patch_index_0000>` and how many consecutive patch tokens follow it.
    patch_index_first: Option<u32>,
    num_patch_index_tokens: u32,
}

impl KosmosTokenizer {
    /// Loads a `tokenizer.json` file (no network access).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let inner = Tokenizer::from_file(path)
            .map_err(|err| TokenizerError::Load(format!("{}: {err}", path.display())))?;
        Self::from_tokenizer(inner)
    }

    /// Loads a `tokenizer.json` from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        let inner =
            Tokenizer::from_bytes(bytes).map_err(|err| TokenizerError::Load(err.to_string()))?;
        Self::from_tokenizer(inner)
    }

    /// Wraps a loaded tokenizer; `<s>`, `<pad>`, `</s>`, `<unk>`, `<image>` and `</image>` are required.
    ///
    /// Other tags and the patch index tokens are optional (a KOSMOS-1 vocabulary lacks the grounding
    /// tags); the patch tokens count as present when `<patch_index_0000>`.. are consecutive ids.
    pub fn from_tokenizer(mut inner: Tokenizer) -> Result<Self, TokenizerError> {
        let required = |inner: &Tokenizer, token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingToken(token.to_owned()))
        };
        let special = SpecialTokenIds {
            bos: required(&inner, "<s>")?,
            pad: required(&inner, "<pad>")?,
            eos: required(&inner, "</s>")?,
            unk: required(&inner, "<unk>")?,
        };
        required(&inner, Tag::BeginImage.as_str())?;
        required(&inner, Tag::EndImage.as_str())?;

        let mut tag_ids = [None; 11];
        for (slot, tag) in tag_ids.iter_mut().zip(Tag::ALL) {
            *slot = inner.token_to_id(tag.as_str());
        }
        let patch_index_first = inner.token_to_id(&patch_index_token(0));
        let mut num_patch_index_tokens = 0;
        if let Some(first) = patch_index_first {
            while num_patch_index_tokens < NUM_PATCH_INDEX_TOKENS
                && inner.token_to_id(&patch_index_token(num_patch_index_tokens))
                    == Some(first + num_patch_index_tokens)
            {
                num_patch_index_tokens += 1;
            }
        }

        // Re-add the present tags with HF's flags, as `Kosmos2Processor.__init__` does.
        let tag_tokens = Tag::ALL
            .into_iter()
            .zip(tag_ids)
            .filter(|(_, id)| id.is_some())
            .map(|(tag, _)| tag.as_str().to_owned());
        let patch_tokens = (0..num_patch_index_tokens).map(patch_index_token);
        let added: Vec<AddedToken> = tag_tokens
            .chain(patch_tokens)
            .map(|content| {
                AddedToken::from(content, false)
                    .lstrip(true)
                    .rstrip(false)
                    .normalized(false)
                    .single_word(false)
            })
            .collect();
        inner
            .add_tokens(added)
            .map_err(|err| TokenizerError::Load(format!("cannot configure tag tokens: {err}")))?;

        Ok(KosmosTokenizer {
            inner,
            special,
            tag_ids,
            patch_index_first: patch_index_first.filter(|_| num_patch_index_tokens > 0),
            num_patch_index_tokens,
        })
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Ids of `<s>`, `<pad>`, `</s>` and `<unk>`.
    pub fn special_ids(&self) -> SpecialTokenIds {
        self.special
    }

    /// Id of `<s>`.
    pub fn bos_id(&self) -> u32 {
        self.special.bos
    }

    /// Id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.special.eos
    }

    /// Id of `<pad>`.
    pub fn pad_id(&self) -> u32 {
        self.special.pad
    }

    /// Id of `<unk>`.
    pub fn unk_id(&self) -> u32 {
        self.special.unk
    }

    /// First image placeholder id, `unk + 1` as in HF (`first_image_token_id`).
    pub fn first_image_placeholder_id(&self) -> u32 {
        self.special.unk + 1
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a tag, `None` if the vocabulary lacks it.
    pub fn tag_id(&self, tag: Tag) -> Option<u32> {
        let index = Tag::ALL.iter().position(|&candidate| candidate == tag)?;
        self.tag_ids[index]
    }

    /// Id of a tag, or an error naming the missing token.
    pub fn require_tag_id(&self, tag: Tag) -> Result<u32, TokenizerError> {
        self.tag_id(tag)
            .ok_or_else(|| TokenizerError::MissingToken(tag.as_str().to_owned()))
    }

    /// Id of `<patch_index_{index:04}>`, `None` when out of range or absent.
    pub fn patch_index_id(&self, index: u32) -> Option<u32> {
        let first = self.patch_index_first?;
        (index < self.num_patch_index_tokens).then_some(first + index)
    }

    /// Number of patch index tokens present (1024 for Kosmos-2, 0 for a vocabulary without them).
    pub fn num_patch_index_tokens(&self) -> u32 {
        self.num_patch_index_tokens
    }

    /// Id of any token by its text (vocabulary or added token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Text of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Encodes text without adding special tokens (HF `add_special_tokens=False`).
    ///
    /// Special and tag tokens written in the text are still recognised, as in HF.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, false)
    }

    /// Encodes text, running the tokenizer's post-processor when `add_special_tokens` (XLM-R: `<s> … </s>`).
    pub fn encode_with(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|err| TokenizerError::Encode(err.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids like HF's fast tokenizer `decode(ids, skip_special_tokens)` with
    /// `clean_up_tokenization_spaces=False`.
    ///
    /// With `skip_special_tokens`, `<s>`, `</s>`, `<pad>` and `<unk>`-like special tokens disappear and the
    /// tag tokens (non-special) stay.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|err| TokenizerError::Decode(err.to_string()))
    }
}

/// HF's `PreTrainedTokenizerBase.clean_up_tokenization`: removes the space before some punctuation and
/// English contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_index_tokens_are_zero_padded_to_four_digits() {
        assert_eq!(patch_index_token(44), "<patch_index_0044>");
        assert_eq!(patch_index_token(1023), "<patch_index_1023>");
    }

    #[test]
    fn tags_round_trip_through_their_text() {
        for tag in Tag::ALL {
            assert_eq!(Tag::from_token(tag.as_str()), Some(tag));
        }
        assert_eq!(Tag::from_token("<s>"), None);
    }

    #[test]
    fn cleanup_removes_spaces_before_punctuation() {
        assert_eq!(
            clean_up_tokenization("a snowman , warm . I 'm"),
            "a snowman, warm. I'm"
        );
    }
}
