//! Text to token ids and back, with the model's own `tokenizer.json`.

use std::path::Path;

use super::model_dir::ModelDirError;

/// The model's tokenizer plus the few facts about it the engine needs.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos_to_prepend: Option<u32>,
}

/// Tokenizing or detokenizing failed.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer failed: {0}")]
pub struct TokenizeError(String);

impl TextTokenizer {
    /// Loads `tokenizer.json`. `bos_to_prepend` is the BOS id when the model wants one in
    /// front of every prompt.
    pub fn load(path: &Path, bos_to_prepend: Option<u32>) -> Result<Self, ModelDirError> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| ModelDirError::BadTokenizer {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            vocab_size,
            bos_to_prepend,
        })
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
    /// `<|im_start|>`) become their ids; a BOS is prepended when the model asks for one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizeError(e.to_string()))?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if let Some(bos) = self.bos_to_prepend
            && ids.first() != Some(&bos)
        {
            out.push(bos);
        }
        out.extend_from_slice(ids);
        Ok(out)
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
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full
            .get(prefix.len()..)
            .filter(|rest| !rest.is_empty())
            .map(str::to_owned))
    }
}
