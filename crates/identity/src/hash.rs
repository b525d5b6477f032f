//! Identifiers kept after an erasure (suppression lists, cache key names) are stored as
//! keyed hashes, never in clear: HMAC-SHA256 (RFC 2104) under `identifier_hash_key`.
//!
//! Keyed, because a plain hash of an e-mail or a phone number is reversed by hashing
//! every candidate; without the key nobody can test a guess against a stored hash. Every
//! replica of every service must use the same key, and it must never change: a hash
//! under another key matches nothing, so existing suppressions would stop applying.

use sha2::{Digest, Sha256};

/// The key `waymark dev` and tests use when none is configured. It is public, so a
/// deployment sets its own (`WAYMARK_IDENTIFIER_HASH_KEY`).
pub const DEV_HASH_KEY: &str = "waymark-dev-identifier-hash-key-not-for-production";

/// SHA-256's block size: HMAC pads or hashes the key to it.
const BLOCK: usize = 64;

/// Hashes identifiers under one key.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentHasher {
    /// The key XORed with the inner and outer pads, ready to start each hash.
    inner_pad: [u8; BLOCK],
    outer_pad: [u8; BLOCK],
}

impl std::fmt::Debug for IdentHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentHasher(***)")
    }
}

impl Default for IdentHasher {
    fn default() -> Self {
        Self::new(DEV_HASH_KEY.as_bytes())
    }
}

impl IdentHasher {
    /// A hasher with `key` (any length; longer than a block is hashed first, as HMAC says).
    pub fn new(key: &[u8]) -> Self {
        let mut block = [0u8; BLOCK];
        if key.len() > BLOCK {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let (mut inner_pad, mut outer_pad) = ([0x36u8; BLOCK], [0x5cu8; BLOCK]);
        for i in 0..BLOCK {
            inner_pad[i] ^= block[i];
            outer_pad[i] ^= block[i];
        }
        Self {
            inner_pad,
            outer_pad,
        }
    }

    /// HMAC-SHA256 of `message` under the key.
    pub fn mac(&self, message: &[u8]) -> [u8; 32] {
        let inner = Sha256::new()
            .chain_update(self.inner_pad)
            .chain_update(message)
            .finalize();
        Sha256::new()
            .chain_update(self.outer_pad)
            .chain_update(inner)
            .finalize()
            .into()
    }

    /// The stored form of a (normalised) identifier's value: the hex HMAC of
    /// `type NUL value`, so equal values of different types hash apart.
    pub fn hash(&self, id_type: &str, value: &str) -> String {
        let mut message = Vec::with_capacity(id_type.len() + 1 + value.len());
        message.extend_from_slice(id_type.as_bytes());
        message.push(0);
        message.extend_from_slice(value.as_bytes());
        self.mac(&message)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// `(type, hash)` of an identifier, as suppression lists store it.
    pub fn hashed(&self, (id_type, value): &crate::Ident) -> crate::Ident {
        (id_type.clone(), self.hash(id_type, value))
    }
}

/// True when `value` has the shape of a stored hash (64 lower-case hex digits).
pub fn is_hash(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// RFC 4231 test cases 1, 2 and 6 (a key longer than a block).
    #[test]
    fn matches_rfc_4231() {
        assert_eq!(
            hex(&IdentHasher::new(&[0x0b; 20]).mac(b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex(&IdentHasher::new(b"Jefe").mac(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&IdentHasher::new(&[0xaa; 131])
                .mac(b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn types_and_keys_hash_apart() {
        let h = IdentHasher::default();
        let a = h.hash("user_id", "ada");
        assert!(is_hash(&a));
        assert_ne!(a, h.hash("anonymous_id", "ada"));
        assert_ne!(a, IdentHasher::new(b"another key").hash("user_id", "ada"));
        assert_eq!(a, h.hash("user_id", "ada"));
        assert!(!is_hash("ada@example.com"));
        assert!(!format!("{h:?}").contains("waymark"));
    }
}
