//! Byte-level BPE (GPT-2, SmolLM, Llama 3), built for a cold start: straight from a GGUF
//! header's packed vocabulary (`tokenizer.ggml.model` `gpt2`), or from a `tokenizer.json` of
//! that kind.
//!
//! It encodes and decodes as the `tokenizers` crate does with the tokenizer Ember rebuilt from
//! the same header ([`crate::gguf::gguf_tokenizer`], which `ember model import` still writes out
//! as `tokenizer.json`), or with the same `tokenizer.json`: special (control) tokens and
//! user-defined ones matched first, leftmost-longest; then the pre-tokenizer; the GPT-2
//! byte-to-character map; the merges by rank, the lowest first and leftmost among equals; and
//! on the way back, characters to bytes and lossy UTF-8. The tests check it against `tokenizers`
//! on the real vocabulary (`tests/generation.rs`).
//!
//! Why not `tokenizers`: building its BPE from a 49k-token vocabulary takes a `String` per
//! token and two per merge, a hash map of each, and a cloned reverse map: about 30-40 ms of CPU
//! and 15 MB of fresh memory during the download, on two cores the download needs
//! (BENCHMARKS.md, "Cold start: Ember's own byte-level BPE"). Here the vocabulary is one buffer
//! (the header's, copied once), and the two lookup tables are flat arrays of ids.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use fancy_regex::Regex;

use crate::gguf_header::StringArray;

/// GPT-2's pre-tokenizer pattern (also `tokenizers`' `ByteLevel` pattern).
pub const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer pattern (llama.cpp's `llama-bpe`).
pub const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types that are matched in text before the BPE.
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// A slot no key uses.
const EMPTY: u32 = u32::MAX;

/// How text is cut into words before the BPE.
#[derive(Debug, Clone)]
enum PreTokenizer {
    /// SmolLM: every numeric character on its own, then the GPT-2 pattern on each piece.
    DigitsThenGpt2(Regex),
    /// One pattern (GPT-2's or Llama 3's): each match and each gap between matches is a word.
    Pattern(Regex),
}

/// A byte-level BPE tokenizer over a GGUF header's vocabulary or a tokenizer.json's.
#[derive(Debug, Clone)]
pub struct ByteBpe {
    tokens: StringArray,
    /// Open addressing from a token's text to its id (the last id when a text repeats, as a
    /// hash map filled in id order keeps it).
    vocab: Vec<u32>,
    vocab_shift: u32,
    /// Tokens `..model_len` are the BPE model's: the ones merges and whole words name (the
    /// rest are added tokens, matched in text).
    model_len: usize,
    /// Open addressing from a pair of ids to the merge's rank and the merged id.
    merges: Vec<MergeSlot>,
    merges_shift: u32,
    /// The id of each byte's character in the GPT-2 map, if the vocabulary has it.
    byte_ids: [u32; 256],
    /// A word that is a token of the vocabulary is that token, merges or not (llama.cpp's
    /// `ignore_merges`, which it sets for Llama 3's pre-tokenizer; `tokenizers` has it too).
    ignore_merges: bool,
    /// Control tokens, then user-defined ones: matched in text before the BPE.
    control: AddedTokens,
    user_defined: AddedTokens,
    /// Ids of the control tokens, sorted: skipped by a decode that skips special tokens.
    control_ids: Vec<u32>,
    pre: PreTokenizer,
}

#[derive(Debug, Clone, Copy)]
struct MergeSlot {
    /// `(left << 32) | right`, or `u64::MAX` when empty.
    pair: u64,
    rank: u32,
    merged: u32,
}

const NO_MERGE: MergeSlot = MergeSlot { pair: u64::MAX, rank: 0, merged: 0 };

/// Tokens matched as a whole in text, longest first.
#[derive(Debug, Clone)]
struct AddedTokens {
    /// `(text, id)`, longest text first.
    tokens: Vec<(String, u32)>,
    /// Whether any token starts with this byte.
    first_bytes: [bool; 256],
}

impl Default for AddedTokens {
    fn default() -> Self {
        Self { tokens: Vec::new(), first_bytes: [false; 256] }
    }
}

impl AddedTokens {
    fn new(mut tokens: Vec<(String, u32)>) -> Self {
        tokens.retain(|(t, _)| !t.is_empty());
        tokens.sort_by_key(|(t, _)| Reverse(t.len()));
        let mut first_bytes = [false; 256];
        for (t, _) in &tokens {
            first_bytes[usize::from(t.as_bytes()[0])] = true;
        }
        Self { tokens, first_bytes }
    }

    /// The leftmost match at or after `from`, the longest one there: `(start, end, id)`.
    fn find(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        if self.tokens.is_empty() {
            return None;
        }
        let bytes = text.as_bytes();
        (from..bytes.len()).filter(|&i| self.first_bytes[usize::from(bytes[i])]).find_map(|i| {
            let rest = &bytes[i..];
            self.tokens.iter().find(|(t, _)| rest.starts_with(t.as_bytes())).map(|(t, id)| (i, i + t.len(), *id))
        })
    }

    /// Cuts `text` at each match: `(piece, Some(id))` for a match, `(piece, None)` between.
    fn split<'t>(&self, text: &'t str, out: &mut Vec<(&'t str, Option<u32>)>) {
        let mut at = 0;
        while let Some((start, end, id)) = self.find(text, at) {
            if start > at {
                out.push((&text[at..start], None));
            }
            out.push((&text[start..end], Some(id)));
            at = end;
        }
        if at < text.len() {
            out.push((&text[at..], None));
        }
    }
}

/// FNV-1a over the concatenation of `parts`, so a merged token is looked up without building it.
fn hash(parts: [&[u8]; 2]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The slot a hash starts probing at: the top bits after a multiplicative mix.
fn slot(h: u64, shift: u32) -> usize {
    (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> shift) as usize
}

/// A table of at least twice `n` slots, as a power of two: `(slots, shift)`.
fn table_size(n: usize) -> (usize, u32) {
    let size = (2 * n).max(16).next_power_of_two();
    (size, 64 - size.trailing_zeros())
}

/// GPT-2's map from bytes to characters: printable Latin-1 to itself, the rest to U+0100 on.
const BYTE_CHARS: [char; 256] = {
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    let mut b = 0;
    while b < 256 {
        let printable = matches!(b as u8, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        chars[b] = if printable {
            b as u8 as char
        } else {
            next += 1;
            // Below U+0200: always a char.
            match char::from_u32(next - 1) {
                Some(c) => c,
                None => '\0',
            }
        };
        b += 1;
    }
    chars
};

/// The inverse of [`BYTE_CHARS`], by code point (all are below U+0200).
const CHAR_BYTES: [Option<u8>; 512] = {
    let mut bytes = [None; 512];
    let mut b = 0;
    while b < 256 {
        bytes[BYTE_CHARS[b] as usize] = Some(b as u8);
        b += 1;
    }
    bytes
};

impl ByteBpe {
    /// Builds the tokenizer from a GGUF vocabulary, its merges (`"left right"`, in rank order),
    /// the token types (GGUF's; may be empty) and the header's `tokenizer.ggml.pre`.
    pub fn new(tokens: &StringArray, merges: &StringArray, types: &[i32], pre: &str) -> Result<Self, String> {
        // Lines without a space are skipped, and ranks count the lines kept (as the rebuilt
        // tokenizer reads them).
        let pairs = merges.iter().filter_map(|m| m.split_once(' '));
        let ignore_merges = matches!(pre, "llama3" | "llama-bpe");
        let mut bpe =
            Self::build(tokens.clone(), tokens.len(), pairs, merges.len(), Self::pre_tokenizer(pre)?, ignore_merges)?;
        let added = |kind: i32| -> Vec<(String, u32)> {
            bpe.tokens
                .iter()
                .zip(types)
                .filter(|(_, t)| **t == kind)
                .filter_map(|(text, _)| Some((text.to_owned(), bpe.token_to_id(text)?)))
                .collect()
        };
        let (control, user_defined) = (added(CONTROL), added(USER_DEFINED));
        bpe.set_added(control, user_defined);
        Ok(bpe)
    }

    /// The vocabulary tables and the merges. `tokens` are by id, the model's first
    /// (`model_len` of them: the ones merges and whole words may name), then added tokens.
    fn build<'m>(
        tokens: StringArray,
        model_len: usize,
        merges: impl Iterator<Item = (&'m str, &'m str)>,
        merges_hint: usize,
        pre: PreTokenizer,
        ignore_merges: bool,
    ) -> Result<Self, String> {
        let (size, vocab_shift) = table_size(tokens.len());
        let mut bpe = Self {
            vocab: vec![EMPTY; size],
            vocab_shift,
            merges: Vec::new(),
            merges_shift: 0,
            model_len,
            byte_ids: [EMPTY; 256],
            ignore_merges,
            control: AddedTokens::default(),
            user_defined: AddedTokens::default(),
            control_ids: Vec::new(),
            pre,
            tokens,
        };
        let mut repeats = false;
        for id in 0..bpe.tokens.len() {
            repeats |= bpe.insert_token(id as u32);
        }

        let (size, merges_shift) = table_size(merges_hint);
        bpe.merges = vec![NO_MERGE; size];
        bpe.merges_shift = merges_shift;
        // Merged tokens mostly follow one another in the vocabulary, in rank order: the token
        // after the last merged one is checked first (when no text repeats, a token with the
        // merged text is the one a lookup would find), a lookup made only when it is not.
        let mut after_last = 0usize;
        for (rank, (left, right)) in merges.enumerate() {
            let id = |parts: [&str; 2]| {
                bpe.model_lookup([parts[0].as_bytes(), parts[1].as_bytes()]).ok_or_else(|| {
                    format!("merge `{left} {right}`: token `{}{}` is not in the vocabulary", parts[0], parts[1])
                })
            };
            let pair = (id([left, ""])?, id([right, ""])?);
            let merged = match bpe.tokens.get(after_last) {
                Some(t)
                    if !repeats
                        && after_last < model_len
                        && t.len() == left.len() + right.len()
                        && t.starts_with(left)
                        && t.ends_with(right) =>
                {
                    after_last as u32
                }
                _ => id([left, right])?,
            };
            after_last = merged as usize + 1;
            // A table at most half full keeps probes short; a hint that was too small grows it.
            if 2 * (rank + 1) > bpe.merges.len() {
                bpe.grow_merges();
            }
            bpe.insert_merge(pair, rank as u32, merged);
        }

        let mut utf8 = [0u8; 4];
        for (b, c) in BYTE_CHARS.iter().enumerate() {
            bpe.byte_ids[b] = bpe.model_lookup([c.encode_utf8(&mut utf8).as_bytes(), b""]).unwrap_or(EMPTY);
        }
        Ok(bpe)
    }

    /// Control tokens and user-defined ones, `(text, id)`.
    fn set_added(&mut self, control: Vec<(String, u32)>, user_defined: Vec<(String, u32)>) {
        self.control_ids = control.iter().map(|(_, id)| *id).collect();
        self.control_ids.sort_unstable();
        self.control = AddedTokens::new(control);
        self.user_defined = AddedTokens::new(user_defined);
    }

    fn pre_tokenizer(pre: &str) -> Result<PreTokenizer, String> {
        let regex = |re: &str| Regex::new(re).map_err(|e| format!("pre-tokenizer pattern: {e}"));
        Ok(match pre {
            "smollm" => PreTokenizer::DigitsThenGpt2(regex(GPT2_SPLIT)?),
            "llama3" | "llama-bpe" => PreTokenizer::Pattern(regex(LLAMA3_SPLIT)?),
            _ => PreTokenizer::Pattern(regex(GPT2_SPLIT)?),
        })
    }

    /// Whether a token before it had the same text.
    fn insert_token(&mut self, id: u32) -> bool {
        let text = self.tokens.get(id as usize).unwrap_or_default().as_bytes();
        let mask = self.vocab.len() - 1;
        let mut i = slot(hash([text, b""]), self.vocab_shift);
        loop {
            let held = self.vocab[i];
            let repeat = held != EMPTY && self.tokens.get(held as usize).is_some_and(|t| t.as_bytes() == text);
            if held == EMPTY || repeat {
                self.vocab[i] = id;
                return repeat;
            }
            i = (i + 1) & mask;
        }
    }

    /// The id of the token whose text is `parts` joined.
    fn lookup(&self, parts: [&[u8]; 2]) -> Option<u32> {
        let mask = self.vocab.len() - 1;
        let mut i = slot(hash(parts), self.vocab_shift);
        loop {
            let held = self.vocab[i];
            if held == EMPTY {
                return None;
            }
            let text = self.tokens.get(held as usize).unwrap_or_default().as_bytes();
            if text.len() == parts[0].len() + parts[1].len() && text.starts_with(parts[0]) && text.ends_with(parts[1]) {
                return Some(held);
            }
            i = (i + 1) & mask;
        }
    }

    /// [`ByteBpe::lookup`] among the model's tokens.
    fn model_lookup(&self, parts: [&[u8]; 2]) -> Option<u32> {
        self.lookup(parts).filter(|&id| (id as usize) < self.model_len)
    }

    fn grow_merges(&mut self) {
        let old = std::mem::take(&mut self.merges);
        let size = (old.len() * 2).max(16);
        self.merges = vec![NO_MERGE; size];
        self.merges_shift = 64 - size.trailing_zeros();
        for m in old.into_iter().filter(|m| m.pair != u64::MAX) {
            self.insert_merge(((m.pair >> 32) as u32, m.pair as u32), m.rank, m.merged);
        }
    }

    fn pair_slot(&self, pair: u64) -> usize {
        slot(pair, self.merges_shift)
    }

    /// A repeated pair keeps its last rank, as a hash map filled in rank order does.
    fn insert_merge(&mut self, (left, right): (u32, u32), rank: u32, merged: u32) {
        let pair = (u64::from(left) << 32) | u64::from(right);
        let mask = self.merges.len() - 1;
        let mut i = self.pair_slot(pair);
        while self.merges[i].pair != u64::MAX && self.merges[i].pair != pair {
            i = (i + 1) & mask;
        }
        self.merges[i] = MergeSlot { pair, rank, merged };
    }

    /// The rank and merged id of a pair, if the merges have it.
    fn merge(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        let pair = (u64::from(left) << 32) | u64::from(right);
        let mask = self.merges.len() - 1;
        let mut i = self.pair_slot(pair);
        loop {
            let s = self.merges[i];
            if s.pair == pair {
                return Some((s.rank, s.merged));
            }
            if s.pair == u64::MAX {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// The id of a token's text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.lookup([token.as_bytes(), b""])
    }

    /// The text of every control token.
    pub fn control_tokens(&self) -> Vec<String> {
        self.control.tokens.iter().map(|(t, _)| t.clone()).collect()
    }

    /// The ids of `text`. With `match_control` off, control-token text is encoded as the plain
    /// text it is.
    pub fn encode(&self, text: &str, match_control: bool) -> Result<Vec<u32>, String> {
        let mut pieces = Vec::new();
        if match_control {
            self.control.split(text, &mut pieces);
        } else if !text.is_empty() {
            pieces.push((text, None));
        }
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut plain = Vec::new();
        for (piece, id) in pieces {
            if let Some(id) = id {
                ids.push(id);
                continue;
            }
            plain.clear();
            self.user_defined.split(piece, &mut plain);
            for &(piece, id) in &plain {
                match id {
                    Some(id) => ids.push(id),
                    None => self.encode_plain(piece, &mut ids)?,
                }
            }
        }
        Ok(ids)
    }

    /// Pre-tokenizes `text` (no added tokens in it) and runs the BPE on each word.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) -> Result<(), String> {
        match &self.pre {
            PreTokenizer::Pattern(re) => self.encode_words(re, text, ids),
            PreTokenizer::DigitsThenGpt2(re) => {
                let mut at = 0;
                for (i, c) in text.char_indices().filter(|(_, c)| c.is_numeric()) {
                    if i > at {
                        self.encode_words(re, &text[at..i], ids)?;
                    }
                    at = i + c.len_utf8();
                    self.bpe(&text[i..at], ids);
                }
                if at < text.len() {
                    self.encode_words(re, &text[at..], ids)?;
                }
                Ok(())
            }
        }
    }

    /// Each match of `re` in `text`, and each gap between matches, is a word.
    fn encode_words(&self, re: &Regex, text: &str, ids: &mut Vec<u32>) -> Result<(), String> {
        let mut at = 0;
        for found in re.find_iter(text) {
            let found = found.map_err(|e| format!("pre-tokenizer pattern: {e}"))?;
            if found.start() > at {
                self.bpe(&text[at..found.start()], ids);
            }
            self.bpe(found.as_str(), ids);
            at = found.end();
        }
        if at < text.len() {
            self.bpe(&text[at..], ids);
        }
        Ok(())
    }

    /// One word: its bytes as their characters' ids, merged by rank (the lowest first, the
    /// leftmost among equal ranks), as `tokenizers`' `Word::merge_all` does.
    fn bpe(&self, word: &str, ids: &mut Vec<u32>) {
        #[derive(Clone, Copy)]
        struct Symbol {
            id: u32,
            prev: usize,
            next: usize,
            gone: bool,
        }
        const NONE: usize = usize::MAX;
        if self.ignore_merges {
            let mapped: String = word.bytes().map(|b| BYTE_CHARS[usize::from(b)]).collect();
            if let Some(id) = self.model_lookup([mapped.as_bytes(), b""]) {
                ids.push(id);
                return;
            }
        }
        // Bytes whose character is not in the vocabulary are dropped (no unknown token).
        let mut symbols: Vec<Symbol> = word
            .bytes()
            .map(|b| self.byte_ids[usize::from(b)])
            .filter(|&id| id != EMPTY)
            .map(|id| Symbol { id, prev: NONE, next: NONE, gone: false })
            .collect();
        let n = symbols.len();
        if n == 1 {
            ids.push(symbols[0].id);
            return;
        }
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = if i == 0 { NONE } else { i - 1 };
            s.next = if i + 1 == n { NONE } else { i + 1 };
        }
        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> = (0..n.saturating_sub(1))
            .filter_map(|i| {
                self.merge(symbols[i].id, symbols[i + 1].id).map(|(rank, merged)| Reverse((rank, i, merged)))
            })
            .collect();
        while let Some(Reverse((_, pos, merged))) = queue.pop() {
            let left = symbols[pos];
            if left.gone || left.next == NONE {
                continue;
            }
            let right = symbols[left.next];
            // An entry made stale by an earlier merge no longer names this pair's result.
            if self.merge(left.id, right.id).map(|(_, m)| m) != Some(merged) {
                continue;
            }
            symbols[left.next].gone = true;
            symbols[pos].id = merged;
            symbols[pos].next = right.next;
            if right.next != NONE {
                symbols[right.next].prev = pos;
            }
            if left.prev != NONE {
                if let Some((rank, m)) = self.merge(symbols[left.prev].id, merged) {
                    queue.push(Reverse((rank, left.prev, m)));
                }
            }
            if right.next != NONE {
                if let Some((rank, m)) = self.merge(merged, symbols[right.next].id) {
                    queue.push(Reverse((rank, pos, m)));
                }
            }
        }
        ids.extend(symbols.iter().filter(|s| !s.gone).map(|s| s.id));
    }

    /// The text of `ids`: each token's characters back to bytes (a token with a character
    /// outside the byte map counts as its own UTF-8), then lossy UTF-8. Ids outside the
    /// vocabulary are dropped, and control tokens too when `skip_control` is set.
    pub fn decode(&self, ids: &[u32], skip_control: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let Some(text) = self.tokens.get(id as usize) else { continue };
            if skip_control && self.control_ids.binary_search(&id).is_ok() {
                continue;
            }
            let start = bytes.len();
            for c in text.chars() {
                match CHAR_BYTES.get(c as usize).copied().flatten() {
                    Some(b) => bytes.push(b),
                    None => {
                        bytes.truncate(start);
                        bytes.extend_from_slice(text.as_bytes());
                        break;
                    }
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A `tokenizer.json` read for [`ByteBpe::from_tokenizer_json`]: the strings of its vocabulary
/// and merges borrowed from the file where they have no escapes.
mod json {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct File<'a> {
        #[serde(borrow)]
        pub model: Model<'a>,
        #[serde(default)]
        pub added_tokens: Vec<Added>,
        pub normalizer: Option<serde_json::Value>,
        pub pre_tokenizer: Option<serde_json::Value>,
        pub decoder: Option<serde_json::Value>,
        pub truncation: Option<serde_json::Value>,
        pub padding: Option<serde_json::Value>,
    }

    #[derive(Deserialize)]
    pub struct Model<'a> {
        #[serde(rename = "type")]
        pub kind: Option<String>,
        pub dropout: Option<f64>,
        pub unk_token: Option<String>,
        pub continuing_subword_prefix: Option<String>,
        pub end_of_word_suffix: Option<String>,
        #[serde(default)]
        pub byte_fallback: bool,
        #[serde(default)]
        pub ignore_merges: bool,
        #[serde(borrow)]
        pub vocab: Vocab<'a>,
        #[serde(borrow)]
        pub merges: Merges<'a>,
    }

    #[derive(Deserialize)]
    pub struct Added {
        pub id: u32,
        pub content: String,
        #[serde(default)]
        pub single_word: bool,
        #[serde(default)]
        pub lstrip: bool,
        #[serde(default)]
        pub rstrip: bool,
        #[serde(default = "yes")]
        pub normalized: bool,
        #[serde(default)]
        pub special: bool,
    }

    fn yes() -> bool {
        true
    }

    /// A string, borrowed when the file holds it without escapes.
    pub struct Str<'a>(pub Cow<'a, str>);

    impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Str<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                    Ok(Str(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                    Ok(Str(Cow::Owned(v.to_owned())))
                }
                fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                    Ok(Str(Cow::Owned(v)))
                }
            }
            d.deserialize_str(V)
        }
    }

    /// A merge written as one string: exactly two tokens and one space between them.
    fn pair(line: &str) -> Option<(&str, &str)> {
        line.split_once(' ').filter(|(_, b)| !b.contains(' '))
    }

    /// The vocabulary, `(token, id)` in the file's order.
    pub struct Vocab<'a>(pub Vec<(Str<'a>, u32)>);

    impl<'de: 'a, 'a> Deserialize<'de> for Vocab<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Vocab<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a map of tokens to ids")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                    while let Some(entry) = map.next_entry::<Str<'de>, u32>()? {
                        entries.push(entry);
                    }
                    Ok(Vocab(entries))
                }
            }
            d.deserialize_map(V)
        }
    }

    /// The merges, `(left, right)` in rank order: written as `"left right"` or as
    /// `["left", "right"]`.
    pub struct Merges<'a>(pub Vec<(Str<'a>, Str<'a>)>);

    impl<'de: 'a, 'a> Deserialize<'de> for Merges<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Merge<'a>(Option<(Str<'a>, Str<'a>)>);
            impl<'de> Deserialize<'de> for Merge<'de> {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    struct V;
                    impl<'de> Visitor<'de> for V {
                        type Value = Merge<'de>;
                        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                            f.write_str("a merge, \"left right\" or [\"left\", \"right\"]")
                        }
                        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                            Ok(Merge(pair(v).map(|(a, b)| (Str(Cow::Borrowed(a)), Str(Cow::Borrowed(b))))))
                        }
                        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                            Ok(Merge(pair(v).map(|(a, b)| (Str(Cow::Owned(a.into())), Str(Cow::Owned(b.into()))))))
                        }
                        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                            let (Some(a), Some(b)) = (seq.next_element::<Str<'de>>()?, seq.next_element::<Str<'de>>()?)
                            else {
                                return Ok(Merge(None));
                            };
                            if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                                return Ok(Merge(None));
                            }
                            Ok(Merge(Some((a, b))))
                        }
                    }
                    d.deserialize_any(V)
                }
            }
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Merges<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a list of merges")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                    let mut merges = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                    while let Some(Merge(m)) = seq.next_element::<Merge<'de>>()? {
                        // `tokenizers` refuses a file with such a merge: it reads it then.
                        merges.push(m.ok_or_else(|| serde::de::Error::custom("a merge that is not a pair"))?);
                    }
                    Ok(Merges(merges))
                }
            }
            d.deserialize_seq(V)
        }
    }
}

impl ByteBpe {
    /// The tokenizer of a `tokenizer.json` that is a byte-level BPE this type encodes exactly
    /// as `tokenizers` does: a BPE model without dropout, unknown token, subword affixes or
    /// byte fallback; no normalizer, truncation or padding; GPT-2's byte-level pre-tokenizer
    /// (alone, after single digits as SmolLM's, or after one `Split` pattern as Llama 3's);
    /// the byte-level decoder; added tokens that are special and matched as written,
    /// or plain and matched after normalization, none stripping spaces or whole-word only;
    /// ids without gaps. None for any other file, which `tokenizers` then reads (the post
    /// processor is not read: Ember encodes without adding special tokens).
    pub fn from_tokenizer_json(bytes: &[u8]) -> Option<Self> {
        use serde_json::Value;
        let file: json::File<'_> = serde_json::from_slice(bytes).ok()?;
        let m = &file.model;
        let empty = |s: &Option<String>| s.as_deref().unwrap_or_default().is_empty();
        let supported = m.kind.as_deref().is_none_or(|k| k == "BPE")
            && m.dropout.is_none()
            && m.unk_token.is_none()
            && empty(&m.continuing_subword_prefix)
            && empty(&m.end_of_word_suffix)
            && !m.byte_fallback
            && [&file.normalizer, &file.truncation, &file.padding]
                .iter()
                .all(|v| v.as_ref().is_none_or(Value::is_null))
            && file.decoder.as_ref().and_then(|d| d.get("type")).and_then(Value::as_str) == Some("ByteLevel");
        if !supported {
            return None;
        }
        let pre = json_pre_tokenizer(file.pre_tokenizer.as_ref()?)?;

        // The model's tokens by id, then the added tokens not among them.
        let mut vocab: Vec<(&str, u32)> = m.vocab.0.iter().map(|(t, id)| (t.0.as_ref(), *id)).collect();
        vocab.sort_unstable_by_key(|&(_, id)| id);
        let model_len = vocab.len();
        if vocab.iter().enumerate().any(|(i, &(_, id))| id as usize != i) {
            return None;
        }
        let mut added: Vec<&json::Added> = file.added_tokens.iter().collect();
        added.sort_by_key(|a| a.id);
        let mut tokens = StringArray::default();
        for (t, _) in &vocab {
            tokens.push(t);
        }
        let (mut control, mut user_defined) = (Vec::new(), Vec::new());
        for a in added {
            let id = a.id as usize;
            if id == tokens.len() {
                tokens.push(&a.content);
            } else if tokens.get(id) != Some(a.content.as_str()) {
                return None;
            }
            if a.single_word || a.lstrip || a.rstrip || a.content.is_empty() {
                return None;
            }
            match (a.special, a.normalized) {
                (true, false) => control.push((a.content.clone(), a.id)),
                (false, true) => user_defined.push((a.content.clone(), a.id)),
                _ => return None,
            }
        }
        let merges = m.merges.0.iter().map(|(a, b)| (a.0.as_ref(), b.0.as_ref()));
        let mut bpe = Self::build(tokens, model_len, merges, m.merges.0.len(), pre, m.ignore_merges).ok()?;
        // A text written twice would make the tables disagree with `tokenizers` on its id.
        if control.iter().chain(&user_defined).any(|(t, id)| bpe.token_to_id(t) != Some(*id)) {
            return None;
        }
        bpe.set_added(control, user_defined);
        Some(bpe)
    }
}

/// The pre-tokenizers [`ByteBpe`] reproduces, from a `tokenizer.json`.
fn json_pre_tokenizer(pre: &serde_json::Value) -> Option<PreTokenizer> {
    use serde_json::Value;
    let kind = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_owned);
    let flag = |v: &Value, key: &str, default: bool| v.get(key).map_or(Some(default), Value::as_bool);
    // Byte-level, no prefix space added, with or without its own GPT-2 pattern.
    let byte_level = |v: &Value, use_regex: bool| {
        kind(v).as_deref() == Some("ByteLevel")
            && flag(v, "add_prefix_space", true) == Some(false)
            && flag(v, "use_regex", true) == Some(use_regex)
    };
    let gpt2 = || Regex::new(GPT2_SPLIT).ok();
    if byte_level(pre, true) {
        return Some(PreTokenizer::Pattern(gpt2()?));
    }
    let steps = match kind(pre).as_deref() {
        Some("Sequence") => pre.get("pretokenizers").and_then(Value::as_array)?,
        _ => return None,
    };
    match steps.as_slice() {
        [digits, last]
            if kind(digits).as_deref() == Some("Digits")
                && flag(digits, "individual_digits", false) == Some(true)
                && byte_level(last, true) =>
        {
            Some(PreTokenizer::DigitsThenGpt2(gpt2()?))
        }
        [split, last]
            if kind(split).as_deref() == Some("Split")
                && split.get("behavior").and_then(Value::as_str) == Some("Isolated")
                && flag(split, "invert", false) == Some(false)
                && byte_level(last, false) =>
        {
            let pattern = split.get("pattern")?.get("Regex")?.as_str()?;
            Some(PreTokenizer::Pattern(Regex::new(pattern).ok()?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> StringArray {
        let mut s = StringArray::default();
        for i in items {
            s.push(i);
        }
        s
    }

    /// A word that is a token but that no chain of merges builds: whole under Llama 3's
    /// pre-tokenizer (`ignore_merges`, as llama.cpp and Llama 3's tokenizer.json do), merged
    /// pair by pair otherwise; and the same from `tokenizers` given the same vocabulary.
    #[test]
    fn whole_words_are_kept_only_where_merges_are_ignored() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let merges = ["a b", "b c"];
        for (pre, ignore, want) in
            [("llama3", true, vec![5]), ("smollm", false, vec![3, 2]), ("gpt2", false, vec![3, 2])]
        {
            let ours = ByteBpe::new(&strings(&tokens), &strings(&merges), &[], pre)?;
            assert_eq!(ours.encode("abc", true)?, want, "{pre}");
            let vocab: tokenizers::models::bpe::Vocab =
                tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
            let pairs: Vec<(String, String)> =
                merges.iter().filter_map(|m| m.split_once(' ')).map(|(a, b)| (a.into(), b.into())).collect();
            let theirs =
                tokenizers::models::bpe::BPE::builder().vocab_and_merges(vocab, pairs).ignore_merges(ignore).build()?;
            let ids: Vec<u32> = tokenizers::Model::tokenize(&theirs, "abc")?.iter().map(|t| t.id).collect();
            assert_eq!(ids, want, "{pre}: tokenizers");
        }
        Ok(())
    }
}
