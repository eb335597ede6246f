//! API keys: `Authorization: Bearer <key>` on REST and gRPC, compared in constant time. A key may
//! be limited to a highest priority (`KEY:low` on the command line, a second column in the key
//! file), and is known to the queue by a name made from its hash, never by the key itself.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::core::Priority;

/// Who calls: the name the queue knows the caller by (tasks of different callers take turns) and
/// the highest priority they may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `key-` and the start of the key's SHA-256; empty on an open API.
    pub client: String,
    /// The highest priority the caller may ask for.
    pub max_priority: Priority,
}

impl Caller {
    /// Anyone, on an API without keys.
    pub fn anyone() -> Caller {
        Caller { client: String::new(), max_priority: Priority::High }
    }
}

#[derive(Clone)]
struct Key {
    secret: Vec<u8>,
    caller: Caller,
}

impl Key {
    fn new(secret: &str, max_priority: Priority) -> Key {
        let digest = Sha256::digest(secret.as_bytes());
        let client = format!("key-{}", &hex::encode(digest)[..12]);
        Key { secret: secret.as_bytes().to_vec(), caller: Caller { client, max_priority } }
    }
}

/// Why the keys could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The key file could not be read.
    #[error("cannot read the key file: {0}")]
    Read(#[from] std::io::Error),
    /// A line of the key file is not `KEY` or `KEY PRIORITY`.
    #[error("key file line {line}: expected `KEY` or `KEY PRIORITY` (priority one of high, normal, low)")]
    Line {
        /// The line's number, from 1.
        line: usize,
    },
}

/// The configured keys; empty means the API is open.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Key>,
}

impl ApiKeys {
    /// Keys from flags (`KEY` or `KEY:PRIORITY`) plus one per non-empty line of an optional file
    /// (`KEY`, or `KEY PRIORITY` in two columns). A key without a priority may ask for any.
    pub fn load(keys: &[String], file: Option<&std::path::Path>) -> Result<ApiKeys, KeysError> {
        let mut all: Vec<Key> =
            keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()).map(flag_key).collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)?;
            for (n, line) in text.lines().enumerate() {
                let columns: Vec<&str> = line.split_whitespace().collect();
                let key = match columns[..] {
                    [] => continue,
                    [key] => Key::new(key, Priority::High),
                    [key, priority] => {
                        let priority = Priority::parse(priority).ok_or(KeysError::Line { line: n + 1 })?;
                        Key::new(key, priority)
                    }
                    _ => return Err(KeysError::Line { line: n + 1 }),
                };
                all.push(key);
            }
        }
        Ok(ApiKeys { keys: all })
    }

    /// True when no key is configured.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The caller an `authorization` header value (`Bearer <key>`) names, if it names one.
    pub fn caller(&self, authorization: Option<&[u8]>) -> Option<Caller> {
        if self.is_open() {
            return Some(Caller::anyone());
        }
        let token = authorization.and_then(bearer_token)?;
        // Compare against every key so timing does not reveal which one matched.
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.secret.as_slice().ct_eq(token)) {
                found = Some(&key.caller);
            }
        }
        found.cloned()
    }
}

/// A key from the command line: `KEY`, or `KEY:PRIORITY` where the part after the last colon names
/// a level.
fn flag_key(flag: &str) -> Key {
    let ceiling = flag
        .rsplit_once(':')
        .filter(|(key, _)| !key.is_empty())
        .and_then(|(key, priority)| Some((key, Priority::parse(priority)?)));
    match ceiling {
        Some((key, priority)) => Key::new(key, priority),
        None => Key::new(flag, Priority::High),
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| token.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_their_priority_ceiling_and_a_name_that_is_not_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "file-open\n\n  file-low   low \n").unwrap();
        let keys =
            ApiKeys::load(&["flag-normal:normal".into(), "url:with:colons".into()], Some(&file)).unwrap();
        let caller = |key: &str| keys.caller(Some(format!("Bearer {key}").as_bytes()));
        assert_eq!(caller("flag-normal").unwrap().max_priority, Priority::Normal);
        assert_eq!(caller("url:with:colons").unwrap().max_priority, Priority::High);
        assert_eq!(caller("file-open").unwrap().max_priority, Priority::High);
        let low = caller("file-low").unwrap();
        assert_eq!(low.max_priority, Priority::Low);
        assert!(low.client.starts_with("key-") && low.client.len() == 16 && !low.client.contains("file-low"));
        assert_ne!(low.client, caller("file-open").unwrap().client);
        assert_eq!(caller("flag-normal:normal"), None, "the ceiling is not part of the key");
        assert_eq!(caller("nobody"), None);
        assert_eq!(keys.caller(None), None);
    }

    #[test]
    fn a_key_file_line_with_an_unknown_priority_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "good\nbad urgent\n").unwrap();
        let error = ApiKeys::load(&[], Some(&file)).err().unwrap();
        assert!(error.to_string().starts_with("key file line 2:"), "{error}");
    }

    #[test]
    fn an_open_api_lets_anyone_ask_for_anything() {
        let keys = ApiKeys::load(&[], None).unwrap();
        assert_eq!(keys.caller(None), Some(Caller::anyone()));
    }
}
