//! Where a job's result is written, and the ids derived from the queue message id.
//!
//! The result key is `results/{batch_id}/{custom_id}.json`, so a user finds a result by the
//! id they chose, and a redelivered job aims at the same key, where the store's create-only
//! write turns a second result into a no-op. That needs `custom_id` to be safe as one key
//! component. We refuse unsafe ones instead of escaping them: an escaped key no longer shows
//! the id the user wrote, and the characters refused (`/`, `\`, `..`, control characters) are
//! not ones a sensible id contains.

use crate::store::{validate_key, StoreError};

/// The longest `custom_id` (and `batch_id`) accepted, in bytes. Two of them fit in an S3 key.
pub const MAX_CUSTOM_ID_BYTES: usize = 256;

/// The batch folder of jobs that name none.
pub const DEFAULT_BATCH: &str = "default";

/// Why `id` cannot be one component of an object key, phrased to follow the field's name.
pub(crate) fn component_problem(id: &str) -> Option<String> {
    if id.len() > MAX_CUSTOM_ID_BYTES {
        return Some(format!("is {} bytes long, over the {MAX_CUSTOM_ID_BYTES}-byte limit", id.len()));
    }
    if id.contains(['/', '\\']) {
        return Some("contains '/' or '\\'".into());
    }
    if id.contains("..") {
        return Some("contains '..'".into());
    }
    if let Some(c) = id.chars().find(|c| c.is_control()) {
        return Some(format!("contains the control character U+{:04X}", u32::from(c)));
    }
    None
}

/// `results/{batch_id or "default"}/{custom_id}.json`.
pub fn default_result_key(batch_id: Option<&str>, custom_id: &str) -> String {
    format!("results/{}/{custom_id}.json", batch_id.unwrap_or(DEFAULT_BATCH))
}

/// Where the error result of a job goes: an `_errors/` folder beside its result key (a
/// `custom_id` cannot reach it, having no '/'), so that a job that failed, was fixed and is run
/// again (`ember dlq redrive`) can still write its result. Keys under `_rejected/` are
/// already error keys.
pub fn error_result_key(result_key: &str) -> String {
    if result_key.contains("/_rejected/") {
        return result_key.to_string();
    }
    match result_key.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/_errors/{name}"),
        None => format!("_errors/{result_key}"),
    }
}

/// Where the error result of a job goes when its own key is unknown (no usable `custom_id`):
/// a `_rejected/` folder no `custom_id` can reach, since a `custom_id` cannot contain '/'.
pub fn rejected_result_key(batch_id: Option<&str>, message_id: &str) -> String {
    format!("results/{}/_rejected/{}.json", batch_id.unwrap_or(DEFAULT_BATCH), derived_id(message_id))
}

/// Checks a built key with the store's own rules, so a key accepted here is accepted by
/// every store.
pub(crate) fn store_key_problem(key: &str) -> Option<String> {
    match validate_key(key) {
        Ok(()) => None,
        Err(StoreError::InvalidKey { reason, .. }) => Some(reason.to_string()),
        Err(other) => Some(other.to_string()),
    }
}

/// 32 lowercase hex digits that depend only on the message id: the id itself when it is a
/// UUID (both queues use UUIDs), a 128-bit FNV-1a hash of it otherwise. Result ids built from
/// it make a redelivered job's result line identical to the first.
pub fn derived_id(message_id: &str) -> String {
    if let Ok(uuid) = uuid::Uuid::try_parse(message_id) {
        return uuid.simple().to_string();
    }
    // FNV-1a rather than std's hasher, whose output may change between Rust releases.
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let hash = message_id.bytes().fold(OFFSET, |h, b| (h ^ u128::from(b)).wrapping_mul(PRIME));
    format!("{hash:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_hex() {
        let uuid = "0b7e5c1e-6a1f-4d2b-9d5e-3f0c2a1b4c5d";
        assert_eq!(derived_id(uuid), "0b7e5c1e6a1f4d2b9d5e3f0c2a1b4c5d");
        let other = derived_id("msg 1");
        assert_eq!(other, derived_id("msg 1"));
        assert_ne!(other, derived_id("msg 2"));
        assert_eq!(other.len(), 32);
        assert!(other.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn unsafe_components_are_named() {
        assert_eq!(component_problem("req-1.a_b"), None);
        let long = "x".repeat(MAX_CUSTOM_ID_BYTES + 1);
        for (id, says) in [("a/b", "'/'"), ("..", "'..'"), ("a\u{7}b", "U+0007"), (long.as_str(), "257 bytes")] {
            let problem = component_problem(id).unwrap_or_default();
            assert!(problem.contains(says), "{id:?}: {problem}");
        }
    }

    #[test]
    fn keys_pass_the_store_rules() {
        assert_eq!(default_result_key(None, "q1"), "results/default/q1.json");
        assert_eq!(default_result_key(Some("b7"), "q1"), "results/b7/q1.json");
        assert_eq!(store_key_problem(&rejected_result_key(None, "not a uuid")), None);
        assert!(store_key_problem("results/.ember-tmp-x/q.json").is_some());
    }
}
