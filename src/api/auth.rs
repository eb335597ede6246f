//! API keys: `Authorization: Bearer <key>` on REST and gRPC, compared in constant time.

use subtle::ConstantTimeEq;

/// The configured keys; empty means the API is open.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl ApiKeys {
    /// Keys from flags plus one key per non-empty line of an optional file.
    pub fn load(keys: &[String], file: Option<&std::path::Path>) -> std::io::Result<ApiKeys> {
        let mut all: Vec<Vec<u8>> =
            keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()).map(|k| k.as_bytes().to_vec()).collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)?;
            all.extend(text.lines().map(str::trim).filter(|k| !k.is_empty()).map(|k| k.as_bytes().to_vec()));
        }
        Ok(ApiKeys { keys: all })
    }

    /// True when no key is configured.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks an `authorization` header value (`Bearer <key>`).
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(token) = authorization.and_then(bearer_token) else { return false };
        // Compare against every key so timing does not reveal which one matched.
        self.keys.iter().fold(false, |found, key| found | bool::from(key.as_slice().ct_eq(token)))
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| token.trim_ascii())
}
