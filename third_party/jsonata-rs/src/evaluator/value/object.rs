//! An object's entries in JavaScript's property order (and so jsonata-js's): keys that are
//! array indices ("0", "7", "42") first, in ascending numeric order, then the other keys in
//! insertion order.
//!
//! Ember change: upstream stored objects in a hashbrown `HashMap` with a randomly seeded
//! hasher, so `$keys`, `$string`, `$each` and object output came out in a different order on
//! every run. Here the order is the entries vector's; a hash index (whose seed affects only
//! speed, never order) is built once an object outgrows a linear scan.

use std::hash::BuildHasher;

use bumpalo::collections::String as BumpString;
use bumpalo::collections::Vec as BumpVec;
use bumpalo::Bump;
use hashbrown::{DefaultHashBuilder, HashTable};

use super::Value;

/// Objects up to this many entries are searched linearly (most JSON objects are small).
const LINEAR_MAX: usize = 8;

type Entry<'a> = (BumpString<'a>, &'a Value<'a>);

pub struct ObjectMap<'a> {
    entries: BumpVec<'a, Entry<'a>>,
    /// How many of the first entries have array-index keys (kept sorted by value).
    indices: usize,
    /// Positions in `entries`, by key; `None` while the object is small.
    index: Option<(HashTable<usize, &'a Bump>, DefaultHashBuilder)>,
}

impl<'a> ObjectMap<'a> {
    pub fn new_in(arena: &'a Bump) -> Self {
        Self::with_capacity_in(0, arena)
    }

    pub fn with_capacity_in(capacity: usize, arena: &'a Bump) -> Self {
        ObjectMap {
            entries: BumpVec::with_capacity_in(capacity, arena),
            indices: 0,
            index: None,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, key: &str) -> Option<usize> {
        match &self.index {
            None => self.entries.iter().position(|(k, _)| k.as_str() == key),
            Some((table, hasher)) => table
                .find(hasher.hash_one(key), |&i| self.entries[i].0.as_str() == key)
                .copied(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value<'a>> {
        self.position(key).map(|i| self.entries[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    /// Sets `key`; an existing key keeps its place (as assigning a JavaScript property does).
    pub fn insert(&mut self, key: &str, value: &'a Value<'a>) {
        if let Some(i) = self.position(key) {
            self.entries[i].1 = value;
            return;
        }
        let arena = self.entries.bump();
        let entry = (BumpString::from_str_in(key, arena), value);
        if let Some(n) = array_index(key) {
            let at = self.entries[..self.indices]
                .partition_point(|(k, _)| array_index(k).is_some_and(|m| m < n));
            self.entries.insert(at, entry);
            self.indices += 1;
            if at + 1 < self.entries.len() && self.index.is_some() {
                self.build_index();
                return;
            }
        } else {
            self.entries.push(entry);
        }
        let at = self.entries.len() - 1;
        match &mut self.index {
            Some((table, hasher)) => {
                let entries = &self.entries;
                table.insert_unique(hasher.hash_one(key), at, |&i| {
                    hasher.hash_one(entries[i].0.as_str())
                });
            }
            None if self.entries.len() > LINEAR_MAX => self.build_index(),
            None => {}
        }
    }

    /// Removes `key`, keeping the order of the others (as JavaScript's `delete` does).
    pub fn remove(&mut self, key: &str) -> Option<&'a Value<'a>> {
        let i = self.position(key)?;
        let (_, value) = self.entries.remove(i);
        if i < self.indices {
            self.indices -= 1;
        }
        if self.index.is_some() {
            self.build_index();
        }
        Some(value)
    }

    fn build_index(&mut self) {
        let hasher = DefaultHashBuilder::default();
        let mut table = HashTable::with_capacity_in(self.entries.len(), self.entries.bump());
        for (i, (k, _)) in self.entries.iter().enumerate() {
            let entries = &self.entries;
            table.insert_unique(hasher.hash_one(k.as_str()), i, |&j| {
                hasher.hash_one(entries[j].0.as_str())
            });
        }
        self.index = Some((table, hasher));
    }

    pub fn iter(&self) -> Iter<'_, 'a> {
        Iter(self.entries.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &BumpString<'a>> {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &&'a Value<'a>> {
        self.entries.iter().map(|(_, v)| v)
    }

    /// A copy in `arena`, in the same order.
    pub fn clone_in(&self, arena: &'a Bump) -> Self {
        let mut out = ObjectMap::with_capacity_in(self.len(), arena);
        for (k, v) in self.iter() {
            out.insert(k, v);
        }
        out
    }
}

/// The key's value if it is an array index as JavaScript orders them: the canonical decimal
/// form of an integer from 0 to 2^32 - 2.
fn array_index(key: &str) -> Option<u32> {
    let n: u32 = key.parse().ok()?;
    (n != u32::MAX && n.to_string() == key).then_some(n)
}

/// The entries in order, as `(key, value)`.
pub struct Iter<'m, 'a>(std::slice::Iter<'m, Entry<'a>>);

impl<'m, 'a> Iterator for Iter<'m, 'a> {
    type Item = (&'m BumpString<'a>, &'m &'a Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_, '_> {}

/// Equal when they hold the same keys with equal values, in any order (JSONata's deep
/// equality ignores key order).
impl PartialEq for ObjectMap<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .all(|(k, v)| other.get(k).is_some_and(|w| **v == *w))
    }
}

impl std::fmt::Debug for ObjectMap<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_index_keys_come_first_in_numeric_order_as_in_javascript() {
        let arena = Bump::new();
        let mut m = ObjectMap::new_in(&arena);
        for k in ["b", "10", "2", "a", "01", "4294967295", "0"] {
            m.insert(k, Value::null(&arena));
        }
        let got: Vec<&str> = m.keys().map(|k| k.as_str()).collect();
        assert_eq!(got, ["0", "2", "10", "b", "a", "01", "4294967295"]);
        m.remove("2");
        m.insert("3", Value::null(&arena));
        let got: Vec<&str> = m.keys().map(|k| k.as_str()).collect();
        assert_eq!(got, ["0", "3", "10", "b", "a", "01", "4294967295"]);
    }

    #[test]
    fn keeps_insertion_order_and_finds_keys_small_and_large() {
        let arena = Bump::new();
        for n in [3usize, 40] {
            let mut m = ObjectMap::new_in(&arena);
            let keys: Vec<String> = (0..n).rev().map(|i| format!("k{i}")).collect();
            for (i, k) in keys.iter().enumerate() {
                m.insert(k, Value::number(&arena, i as f64));
            }
            // Re-setting a key keeps its place.
            m.insert(&keys[1], Value::number(&arena, -1.0));
            let got: Vec<&str> = m.keys().map(|k| k.as_str()).collect();
            assert_eq!(got, keys.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(m.get(&keys[1]).map(|v| v.as_f64()), Some(-1.0));
            assert_eq!(
                m.get(&keys[n - 1]).map(|v| v.as_f64()),
                Some((n - 1) as f64)
            );
            assert!(m.get("absent").is_none());
            m.remove(&keys[0]);
            assert_eq!(m.keys().next().map(|k| k.as_str()), Some(keys[1].as_str()));
            assert!(m.get(&keys[0]).is_none());
            assert_eq!(m.get(&keys[2]).map(|v| v.as_f64()), Some(2.0));
            assert_eq!(m.len(), n - 1);
        }
    }
}
