//! The environment of a stage as BuildKit's `llb.EnvList` keeps it: an append-only log of
//! assignments where a key's value is its latest assignment and its position is the
//! position of that latest assignment (re-assigning a key moves it to the end).

use hoist_dockerfile::shell::Env;

/// An ordered environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvList {
    log: Vec<(String, String)>,
}

impl EnvList {
    /// Set `key` (moving it to the end).
    pub fn set(&mut self, key: &str, value: &str) {
        self.log.retain(|(k, _)| k != key);
        self.log.push((key.to_string(), value.to_string()));
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.log
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `KEY=value` entries in order.
    pub fn to_vec(&self) -> Vec<String> {
        self.log.iter().map(|(k, v)| format!("{k}={v}")).collect()
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
    }
}
