//! The tokenizer a loaded model uses: Ember's own byte-level BPE ([`crate::bpe`]), built from a
//! GGUF header's vocabulary or from a `tokenizer.json` it reproduces exactly, or else Hugging
//! Face's.

use std::sync::Arc;

use crate::bpe::ByteBpe;
use crate::error::{LoadError, Result};

/// Text to token ids and back.
#[derive(Clone)]
pub struct Tokenizer {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Hf(Arc<tokenizers::Tokenizer>),
    /// The BPE, and whether special-token text is matched as the token (true) or encoded as
    /// plain text.
    Bpe(Arc<ByteBpe>, bool),
}

impl From<tokenizers::Tokenizer> for Tokenizer {
    fn from(t: tokenizers::Tokenizer) -> Self {
        Self { kind: Kind::Hf(Arc::new(t)) }
    }
}

impl From<ByteBpe> for Tokenizer {
    fn from(t: ByteBpe) -> Self {
        Self { kind: Kind::Bpe(Arc::new(t), true) }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.kind {
            Kind::Hf(_) => "Tokenizer(Hugging Face tokenizers)",
            Kind::Bpe(..) => "Tokenizer(Ember byte-level BPE)",
        })
    }
}

fn tokenizer_error(e: impl std::fmt::Display) -> LoadError {
    LoadError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// A `tokenizer.json`: Ember's byte-level BPE when the file is one that encodes exactly as
    /// Hugging Face's tokenizer does ([`ByteBpe::from_tokenizer_json`]: SmolLM, Llama 3 and
    /// GPT-2 style files without a normalizer), else Hugging Face's.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        match ByteBpe::from_tokenizer_json(bytes) {
            Some(bpe) => Ok(bpe.into()),
            None => crate::chat::tokenizer_from_bytes(bytes).map(Into::into),
        }
    }

    /// The ids of `text`, special-token text included as its token (no BOS or other tokens
    /// added: templates write their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::Hf(t) => Ok(t.encode(text, false).map_err(tokenizer_error)?.get_ids().to_vec()),
            Kind::Bpe(t, match_special) => t.encode(text, *match_special).map_err(tokenizer_error),
        }
    }

    /// The text of `ids`, with special tokens left out when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.kind {
            Kind::Hf(t) => t.decode(ids, skip_special).map_err(tokenizer_error),
            Kind::Bpe(t, _) => Ok(t.decode(ids, skip_special)),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.kind {
            Kind::Hf(t) => t.token_to_id(token),
            Kind::Bpe(t, _) => t.token_to_id(token),
        }
    }

    /// The text of every special token (the ones a decode skips).
    pub fn special_tokens(&self) -> Vec<String> {
        match &self.kind {
            Kind::Hf(t) => {
                t.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect()
            }
            Kind::Bpe(t, _) => t.control_tokens(),
        }
    }

    /// This tokenizer with special-token text encoded as plain text. For a `tokenizer.json`
    /// this is a whole copy of it (tens of MB for a 49k-token BPE): make it when needed.
    pub fn with_special_tokens_as_text(&self) -> Self {
        let kind = match &self.kind {
            Kind::Hf(t) => {
                let mut t = tokenizers::Tokenizer::clone(t);
                t.set_encode_special_tokens(true);
                Kind::Hf(Arc::new(t))
            }
            Kind::Bpe(t, _) => Kind::Bpe(t.clone(), false),
        };
        Self { kind }
    }
}
