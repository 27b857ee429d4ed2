//! Cryptographic primitives: keys that zeroize and never print, AES-256-GCM
//! sealing with bound context, the field ciphertext format, HMAC, HKDF and
//! constant-time comparison.
//!
//! Nothing here knows about tenants or storage; `keys` builds the hierarchy
//! on top of these pieces.

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretBox};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Length of every symmetric key in Coffre (AES-256, HMAC-SHA256).
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Field ciphertext format, written as the first byte of every field.
pub const FIELD_FORMAT_V1: u8 = 1;
/// `format (1) ‖ key_version (4, big endian)`.
const FIELD_HEADER_LEN: usize = 5;

/// Authentication failed, or the bytes are not in a known format. Carries no
/// detail on purpose: the caller decides what the failure means.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("ciphertext failed authentication")]
    Authentication,
    #[error("ciphertext has an unknown format")]
    Format,
}

/// A 256-bit secret key. Zeroizes on drop, prints as `[redacted]`, and gives
/// its bytes out only through [`SecretKey::expose`].
pub struct SecretKey(SecretBox<[u8; KEY_LEN]>);

impl SecretKey {
    /// A fresh key from the thread's OS-seeded CSPRNG.
    pub fn random() -> Self {
        let mut bytes = Box::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(bytes.as_mut());
        Self(SecretBox::new(bytes))
    }

    /// Takes the bytes, wiping the caller's copy.
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        // Built in place on the heap: no copy of the key on the stack.
        let key = Self(SecretBox::init_with_mut(|k: &mut [u8; KEY_LEN]| {
            k.copy_from_slice(bytes)
        }));
        zeroize::Zeroize::zeroize(bytes);
        key
    }

    /// Parses a key from a slice of exactly [`KEY_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self::from_bytes(&mut arr))
    }

    /// The one way key bytes leave this type. Callers must not copy them
    /// anywhere that outlives the borrow.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }

    /// An AES-256-GCM instance for this key; its round keys zeroize on drop.
    pub fn aead(&self) -> Aead256 {
        Aead256(Aes256Gcm::new(self.expose().into()))
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An expanded AES-256-GCM key, kept so that the key schedule is computed
/// once per key rather than once per field.
pub struct Aead256(Aes256Gcm);

impl std::fmt::Debug for Aead256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Aead256 {
    /// `nonce ‖ ciphertext ‖ tag`, with a random 96-bit nonce.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        self.seal_into(&mut out, aad, plaintext);
        out
    }

    fn seal_into(&self, out: &mut Vec<u8>, aad: &[u8], plaintext: &[u8]) {
        let nonce = random_array::<NONCE_LEN>();
        let ct = self
            .0
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // aes-gcm fails only for messages over 64 GiB; ours are bounded
            // far below by the input limits.
            .expect("AES-GCM plaintext within size limits");
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
    }

    /// Opens what [`Aead256::seal`] produced under the same AAD.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Format);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.0
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Authentication)
    }

    /// Seals a field value: `header ‖ nonce ‖ ciphertext ‖ tag`. The header
    /// (format and key version) is authenticated with the context as AAD, so
    /// neither can be swapped without detection.
    pub fn seal_field(&self, key_version: u32, aad: &mut FieldAad, plaintext: &[u8]) -> Vec<u8> {
        let aad = aad.for_version(key_version);
        let mut out = Vec::with_capacity(FIELD_HEADER_LEN + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&aad[..FIELD_HEADER_LEN]);
        self.seal_into(&mut out, aad, plaintext);
        out
    }

    /// Opens a field sealed by [`Aead256::seal_field`] with the same context.
    pub fn open_field(
        &self,
        aad: &mut FieldAad,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let version = field_key_version(sealed)?;
        self.open(aad.for_version(version), &sealed[FIELD_HEADER_LEN..])
    }
}

/// The AAD of a field: its header followed by the context parts
/// (length-prefixed), built once, in one allocation, per field.
pub struct FieldAad(Vec<u8>);

impl FieldAad {
    pub fn new(label: &str, parts: &[&[u8]]) -> Self {
        let len =
            FIELD_HEADER_LEN + 4 + label.len() + parts.iter().map(|p| 4 + p.len()).sum::<usize>();
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&[FIELD_FORMAT_V1, 0, 0, 0, 0]);
        for part in std::iter::once(label.as_bytes()).chain(parts.iter().copied()) {
            let n = u32::try_from(part.len()).expect("context part under 4 GiB");
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(part);
        }
        Self(v)
    }

    fn for_version(&mut self, key_version: u32) -> &[u8] {
        self.0[1..FIELD_HEADER_LEN].copy_from_slice(&key_version.to_be_bytes());
        &self.0
    }
}

/// The key version named in a field's header, to pick the key that opens it.
pub fn field_key_version(sealed: &[u8]) -> Result<u32, CryptoError> {
    if sealed.len() < FIELD_HEADER_LEN + NONCE_LEN + TAG_LEN || sealed[0] != FIELD_FORMAT_V1 {
        return Err(CryptoError::Format);
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&sealed[1..FIELD_HEADER_LEN]);
    Ok(u32::from_be_bytes(v))
}

/// The plaintext length of a sealed field (what a copy of the data
/// directory shows anyway: sizes are not secret: docs/threat-model.md, T1).
pub fn field_plaintext_len(sealed: &[u8]) -> Option<usize> {
    sealed
        .len()
        .checked_sub(FIELD_HEADER_LEN + NONCE_LEN + TAG_LEN)
}

/// Builds unambiguous byte strings from parts: each part is prefixed by its
/// length, so `("ab","c")` and `("a","bc")` never collide.
#[derive(Default)]
pub struct Context(Vec<u8>);

impl Context {
    pub fn new(label: &str) -> Self {
        let mut c = Self(Vec::with_capacity(96));
        c.push(label.as_bytes());
        c
    }

    pub fn push(&mut self, part: &[u8]) -> &mut Self {
        let len = u32::try_from(part.len()).expect("context part under 4 GiB");
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(part);
        self
    }

    pub fn with(mut self, part: &[u8]) -> Self {
        self.push(part);
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 over `data` under `key`.
pub fn hmac_sha256(key: &SecretKey, data: &[u8]) -> [u8; 32] {
    let mut mac =
        <HmacSha256 as Mac>::new_from_slice(key.expose()).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 over data given piece by piece (a file streamed in
/// constant memory).
pub struct MacStream(HmacSha256);

impl MacStream {
    pub fn new(key: &SecretKey) -> Self {
        Self(<HmacSha256 as Mac>::new_from_slice(key.expose()).expect("HMAC takes any key length"))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into_bytes().into()
    }
}

/// A subkey of `ikm` for one named purpose (HKDF-SHA256, RFC 5869).
pub fn derive_key(ikm: &SecretKey, info: &str) -> SecretKey {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(b"coffre/hkdf/v1"), ikm.expose());
    let mut okm = [0u8; KEY_LEN];
    hk.expand(info.as_bytes(), &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    SecretKey::from_bytes(&mut okm)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Equality of secrets in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Random bytes from the thread-local CSPRNG (ChaCha, seeded and periodically
/// reseeded from the OS), so that a nonce costs no system call.
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_round_trip_and_context_binding() {
        let key = SecretKey::random().aead();
        let mut ctx = FieldAad::new("f", &[b"tenant", b"rec", b"name"]);
        let sealed = key.seal_field(7, &mut ctx, b"Dupont");
        assert_eq!(field_key_version(&sealed), Ok(7));
        assert_eq!(&key.open_field(&mut ctx, &sealed).unwrap()[..], b"Dupont");

        let mut other = FieldAad::new("f", &[b"tenant", b"rec2", b"name"]);
        assert_eq!(
            key.open_field(&mut other, &sealed),
            Err(CryptoError::Authentication)
        );
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(key.open_field(&mut ctx, &flipped).is_err());
        // A header claiming another version must not open either.
        let mut reversioned = sealed.clone();
        reversioned[4] ^= 1;
        assert!(key.open_field(&mut ctx, &reversioned).is_err());
    }

    #[test]
    fn context_parts_do_not_collide() {
        let a = Context::new("x").with(b"ab").with(b"c");
        let b = Context::new("x").with(b"a").with(b"bc");
        assert_ne!(a.as_bytes(), b.as_bytes());
    }

    #[test]
    fn keys_print_redacted() {
        let k = SecretKey::random();
        assert_eq!(format!("{k:?}"), "[redacted]");
        assert_eq!(format!("{:?}", k.aead()), "[redacted]");
    }

    #[test]
    fn nonces_differ() {
        let key = SecretKey::random().aead();
        let a = key.seal(b"", b"same");
        let b = key.seal(b"", b"same");
        assert_ne!(a, b);
    }
}
