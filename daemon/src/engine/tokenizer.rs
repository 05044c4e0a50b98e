//! Text to token ids and back, with the model's own `tokenizer.json`.

use std::path::Path;

use super::model_dir::ModelDirError;

/// The model's tokenizer plus the few facts about it the engine needs.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos_to_prepend: Option<u32>,
    /// The text of every special added token (`<|im_start|>`, `<|im_end|>`, ...).
    control_tokens: Vec<String>,
}

/// Tokenizing or detokenizing failed.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer failed: {0}")]
pub struct TokenizeError(String);

impl TextTokenizer {
    /// Loads `tokenizer.json`. `bos_to_prepend` is the BOS id when the model wants one in
    /// front of every prompt.
    ///
    /// Truncation and padding settings in the file are dropped: inputs are never cut short
    /// behind the caller's back, and batches are padded by whoever builds them.
    pub fn load(path: &Path, bos_to_prepend: Option<u32>) -> Result<Self, ModelDirError> {
        let bad = |reason: String| ModelDirError::BadTokenizer {
            path: path.to_path_buf(),
            reason,
        };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        inner
            .with_truncation(None)
            .map_err(|e| bad(e.to_string()))?
            .with_padding(None);
        let vocab_size = inner.get_vocab_size(true);
        let mut control_tokens: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|token| token.special && !token.content.is_empty())
            .map(|token| token.content)
            .collect();
        control_tokens.sort();
        Ok(Self {
            inner,
            vocab_size,
            bos_to_prepend,
            control_tokens,
        })
    }

    /// The first special token written out in `text`, if any. Chat message contents must
    /// not contain one: encoded as its id, it would let a message close its own turn and
    /// open one with another role.
    pub fn find_control_token(&self, text: &str) -> Option<&str> {
        self.control_tokens
            .iter()
            .find(|token| text.contains(token.as_str()))
            .map(String::as_str)
    }

    /// Number of distinct ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The text of one token id (used for the chat template's `bos_token` / `eos_token`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Encodes a prompt. Special tokens written in the text (such as a chat template's
    /// `<|im_start|>`) become their ids. With `add_bos`, a BOS is prepended when the model
    /// asks for one; rendered chat templates carry their own, as Hugging Face's
    /// `apply_chat_template` assumes.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizeError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizeError(e.to_string()))?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if let Some(bos) = self.bos_to_prepend.filter(|_| add_bos)
            && ids.first() != Some(&bos)
        {
            out.push(bos);
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Encodes one input of an encoder model: special tokens written in the text become their
    /// ids, and the tokenizer's post-processor adds the ones the model expects around a
    /// single sequence (BERT's `[CLS] ... [SEP]`).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizeError(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizeError(e.to_string()))
    }
}

/// Turns a growing list of token ids into text deltas that are always whole UTF-8
/// characters, even when one character spans several tokens.
///
/// Decoding each token alone is wrong for byte-level vocabularies (a token may hold half a
/// character) and for tokenizers whose decoders look at neighbours (leading spaces). So the
/// decoder re-decodes a short window and emits only what grew since the last emission, and
/// holds back text that still ends in an incomplete character.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

/// How many prompt tokens the window starts with, for decoders that need left context.
const PROMPT_CONTEXT_TOKENS: usize = 4;

/// Most tokens the window may hold back. Past this (a run of tokens that decode to nothing,
/// or bytes that never complete a character) the window moves on, so decoding stays cheap
/// and text keeps flowing; an incomplete character is then shown as U+FFFD.
const MAX_HELD_TOKENS: usize = 16;

impl IncrementalDecoder {
    /// Starts after the prompt; its last few tokens give the decoder left context.
    pub fn after_prompt(prompt: &[u32]) -> Self {
        let context = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        Self {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds one token and returns the text it completes, if any.
    pub fn push(
        &mut self,
        tokenizer: &TextTokenizer,
        token: u32,
    ) -> Result<Option<String>, TokenizeError> {
        self.ids.push(token);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        let held = self.ids.len() - self.read_offset;
        if held >= MAX_HELD_TOKENS {
            return Ok(self.advance(&prefix, &full));
        }
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(delta) = full.get(prefix.len()..) else {
            // The window's decoding changed earlier text (the decoder is not prefix-stable
            // here); wait for more tokens rather than emit something inconsistent.
            return Ok(None);
        };
        let delta = delta.to_owned();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(delta))
    }

    /// Text still held back at the end of generation (for example an incomplete
    /// character, which then decodes to U+FFFD so the output stays valid UTF-8).
    pub fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<Option<String>, TokenizeError> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        Ok(self.advance(&prefix, &full))
    }

    /// Moves the window to the end and returns whatever text grew, even if incomplete.
    fn advance(&mut self, prefix: &str, full: &str) -> Option<String> {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        full.get(prefix.len()..)
            .filter(|rest| !rest.is_empty())
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> TextTokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../local/models/fixture-fused/tokenizer.json");
        TextTokenizer::load(&path, None).expect("run scripts/setup.sh: fixture tokenizer")
    }

    fn stream(tokenizer: &TextTokenizer, ids: &[u32]) -> Vec<String> {
        let mut decoder = IncrementalDecoder::after_prompt(&[]);
        let mut out = Vec::new();
        for &id in ids {
            out.extend(decoder.push(tokenizer, id).expect("decodes"));
        }
        out.extend(decoder.flush(tokenizer).expect("decodes"));
        out
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let tokenizer = fixture_tokenizer();
        let text = "é日本🙂 done";
        let ids = tokenizer.encode(text, false).expect("encodes");
        assert!(ids.len() > text.chars().count(), "byte tokens expected");
        let chunks = stream(&tokenizer, &ids);
        assert_eq!(chunks.concat(), text);
        assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    }

    #[test]
    fn a_character_that_never_completes_ends_as_a_replacement() {
        let tokenizer = fixture_tokenizer();
        // The first two bytes of a three-byte character, then nothing.
        let ids = tokenizer.encode("日", false).expect("encodes");
        let chunks = stream(&tokenizer, &ids[..ids.len() - 1]);
        assert_eq!(chunks.concat(), "\u{FFFD}");
    }

    #[test]
    fn tokens_without_text_do_not_grow_the_window_forever() {
        let tokenizer = fixture_tokenizer();
        let im_end = 2;
        let mut decoder = IncrementalDecoder::after_prompt(&[]);
        for _ in 0..100 {
            assert_eq!(decoder.push(&tokenizer, im_end).expect("decodes"), None);
        }
        assert!(decoder.ids.len() - decoder.prefix_offset <= 2 * MAX_HELD_TOKENS);
        let hi = tokenizer.encode("hi", false).expect("encodes");
        let text: String = hi
            .iter()
            .filter_map(|&id| decoder.push(&tokenizer, id).expect("decodes"))
            .collect();
        assert_eq!(text, "hi");
    }
}
