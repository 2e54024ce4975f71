//! The environment of a stage as BuildKit's `llb.EnvList` keeps it: an append-only log of
//! assignments where a key's value is its latest assignment and its position is the
//! position of that latest assignment (re-assigning a key moves it to the end).
//!
//! Lookups and assignments are O(1) (an index beside the log), so a Dockerfile of thousands
//! of ENV instructions converts in linear time.

use std::collections::HashMap;

use hoist_dockerfile::shell::Env;

/// An ordered environment.
#[derive(Debug, Clone, Default)]
pub struct EnvList {
    /// Assignments in order; a re-assigned key leaves a `None` where it was.
    log: Vec<Option<(String, String)>>,
    /// Position in `log` of each key's latest assignment.
    index: HashMap<String, usize>,
    /// Bytes of `KEY=value` over the live entries.
    bytes: usize,
}

impl PartialEq for EnvList {
    fn eq(&self, other: &Self) -> bool {
        self.to_vec() == other.to_vec()
    }
}

impl Eq for EnvList {}

impl EnvList {
    /// Set `key` (moving it to the end).
    pub fn set(&mut self, key: &str, value: &str) {
        if let Some(old) = self.index.remove(key) {
            if let Some((k, v)) = self.log[old].take() {
                self.bytes -= k.len() + v.len() + 1;
            }
        }
        // Compact once the log is mostly tombstones, keeping it linear in live entries.
        if self.log.len() > 64 && self.log.len() > 2 * self.index.len() {
            self.log.retain(Option::is_some);
            for (i, e) in self.log.iter().enumerate() {
                if let Some((k, _)) = e {
                    self.index.insert(k.clone(), i);
                }
            }
        }
        self.bytes += key.len() + value.len() + 1;
        self.index.insert(key.to_string(), self.log.len());
        self.log.push(Some((key.to_string(), value.to_string())));
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        let i = *self.index.get(key)?;
        self.log[i].as_ref().map(|(_, v)| v.as_str())
    }

    /// `KEY=value` entries in order.
    pub fn to_vec(&self) -> Vec<String> {
        self.log.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// Total size of the `KEY=value` entries, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Env for EnvList {
    fn lookup(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassigned_key_moves_to_the_end_with_its_new_value() {
        let mut e = EnvList::default();
        e.set("A", "1");
        e.set("B", "2");
        e.set("A", "3");
        assert_eq!(e.to_vec(), vec!["B=2", "A=3"]);
        assert_eq!(e.get("A"), Some("3"));
        assert_eq!(e.get("C"), None);
        assert_eq!(e.bytes(), 6);
    }

    #[test]
    fn many_reassignments_stay_ordered_and_counted() {
        let mut e = EnvList::default();
        for i in 0..1000 {
            e.set(&format!("K{}", i % 7), &i.to_string());
        }
        let v = e.to_vec();
        assert_eq!(v, ["K6=993", "K0=994", "K1=995", "K2=996", "K3=997", "K4=998", "K5=999"]);
        assert_eq!(e.bytes(), v.iter().map(String::len).sum::<usize>());
    }
}
