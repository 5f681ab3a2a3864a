//! Byte-level BPE built straight from a GGUF header's packed vocabulary (`tokenizer.ggml.model`
//! `gpt2`: GPT-2, SmolLM, Llama 3, Qwen), for a cold start.
//!
//! It encodes and decodes as the `tokenizers` crate does with the tokenizer Ember rebuilt from
//! the same header ([`crate::gguf::gguf_tokenizer`], which `ember model import` still writes out
//! as `tokenizer.json`): control tokens (type 3) and user-defined tokens (type 4) matched
//! first, leftmost-longest; then the pre-tokenizer the header names; the GPT-2 byte-to-character
//! map; the merges by rank, the lowest first and leftmost among equals; and on the way back,
//! characters to bytes and lossy UTF-8. The tests check it against that tokenizer on the real
//! vocabulary (`tests/generation.rs`).
//!
//! Why not `tokenizers`: building its BPE from a 49k-token vocabulary takes a `String` per
//! token and two per merge, a hash map of each, and a cloned reverse map: about 40 ms of CPU and
//! 15 MB of fresh memory during the download, on two cores the download needs (BENCHMARKS.md,
//! "Cold start: Ember's own byte-level BPE for GGUF"). Here the vocabulary stays the header's
//! one buffer, and the two lookup tables are flat arrays of ids built in a few milliseconds.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use fancy_regex::Regex;

use crate::gguf_header::StringArray;

/// GPT-2's pre-tokenizer pattern (also `tokenizers`' `ByteLevel` pattern).
pub(crate) const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer pattern (llama.cpp's `llama-bpe`).
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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

/// A byte-level BPE tokenizer over a GGUF vocabulary.
#[derive(Debug, Clone)]
pub struct ByteBpe {
    tokens: StringArray,
    /// Open addressing from a token's text to its id (the last id when a text repeats, as a
    /// hash map filled in id order keeps it).
    vocab: Vec<u32>,
    vocab_shift: u32,
    /// Open addressing from a pair of ids to the merge's rank and the merged id.
    merges: Vec<MergeSlot>,
    merges_shift: u32,
    /// The id of each byte's character in the GPT-2 map, if the vocabulary has it.
    byte_ids: [u32; 256],
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
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[usize::from(b)] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    chars
}

/// The inverse of [`byte_chars`], by code point (all are below U+0200).
fn char_bytes() -> [Option<u8>; 512] {
    let mut bytes = [None; 512];
    for (b, c) in byte_chars().iter().enumerate() {
        bytes[*c as usize] = u8::try_from(b).ok();
    }
    bytes
}

impl ByteBpe {
    /// Builds the tokenizer from a vocabulary, its merges (`"left right"`, in rank order), the
    /// token types (GGUF's; may be empty) and the header's `tokenizer.ggml.pre`.
    pub fn new(tokens: &StringArray, merges: &StringArray, types: &[i32], pre: &str) -> Result<Self, String> {
        let tokens = tokens.clone();
        let (size, vocab_shift) = table_size(tokens.len());
        let mut bpe = Self {
            vocab: vec![EMPTY; size],
            vocab_shift,
            merges: Vec::new(),
            merges_shift: 0,
            byte_ids: [EMPTY; 256],
            control: AddedTokens::default(),
            user_defined: AddedTokens::default(),
            control_ids: Vec::new(),
            pre: Self::pre_tokenizer(pre)?,
            tokens,
        };
        let mut repeats = false;
        for id in 0..bpe.tokens.len() {
            repeats |= bpe.insert_token(id as u32);
        }

        let (size, merges_shift) = table_size(merges.len());
        bpe.merges = vec![NO_MERGE; size];
        bpe.merges_shift = merges_shift;
        // Merged tokens mostly follow one another in the vocabulary, in rank order: the token
        // after the last merged one is checked first (when no text repeats, a token with the
        // merged text is the one a lookup would find), a lookup made only when it is not.
        let mut after_last = 0usize;
        // Lines without a space are skipped, and ranks count the lines kept (as the rebuilt
        // tokenizer reads them).
        for (rank, (left, right)) in merges.iter().filter_map(|m| m.split_once(' ')).enumerate() {
            let id = |parts: [&str; 2]| {
                bpe.lookup([parts[0].as_bytes(), parts[1].as_bytes()]).ok_or_else(|| {
                    format!("merge `{left} {right}`: token `{}{}` is not in the vocabulary", parts[0], parts[1])
                })
            };
            let pair = (id([left, ""])?, id([right, ""])?);
            let merged = match bpe.tokens.get(after_last) {
                Some(t)
                    if !repeats && t.len() == left.len() + right.len() && t.starts_with(left) && t.ends_with(right) =>
                {
                    after_last as u32
                }
                _ => id([left, right])?,
            };
            after_last = merged as usize + 1;
            bpe.insert_merge(pair, rank as u32, merged);
        }

        let mut utf8 = [0u8; 4];
        for (b, c) in byte_chars().iter().enumerate() {
            bpe.byte_ids[b] = bpe.lookup([c.encode_utf8(&mut utf8).as_bytes(), b""]).unwrap_or(EMPTY);
        }

        let added = |kind: i32| -> Vec<(String, u32)> {
            bpe.tokens
                .iter()
                .zip(types)
                .filter(|(_, t)| **t == kind)
                .filter_map(|(text, _)| Some((text.to_owned(), bpe.lookup([text.as_bytes(), b""])?)))
                .collect()
        };
        let (control, user_defined) = (added(CONTROL), added(USER_DEFINED));
        bpe.control_ids = control.iter().map(|(_, id)| *id).collect();
        bpe.control_ids.sort_unstable();
        bpe.control = AddedTokens::new(control);
        bpe.user_defined = AddedTokens::new(user_defined);
        Ok(bpe)
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
        let char_bytes = char_bytes();
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let Some(text) = self.tokens.get(id as usize) else { continue };
            if skip_control && self.control_ids.binary_search(&id).is_ok() {
                continue;
            }
            let start = bytes.len();
            for c in text.chars() {
                match char_bytes.get(c as usize).copied().flatten() {
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
