//! The second factor: TOTP (RFC 6238 — HMAC-SHA-1, 6 digits, 30-second
//! steps, one step of drift either way), its enrolment URI, and one-time
//! recovery codes.
//!
//! A code is accepted once: the step it matched is stored, and only later
//! steps are accepted afterwards. Secrets never leave this module but in
//! the enrolment URI, shown once to the principal enrolling.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use zeroize::Zeroizing;

use crate::crypto;

/// Seconds per step.
pub const STEP_SECS: i64 = 30;
/// Recovery codes made at enrolment.
pub const RECOVERY_CODES: usize = 10;
const SECRET_LEN: usize = 20;
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// A TOTP secret: 160 random bits, zeroized on drop, never printed.
pub struct TotpSecret(Zeroizing<Vec<u8>>);

impl TotpSecret {
    pub fn random() -> Self {
        Self(Zeroizing::new(
            crypto::random_array::<SECRET_LEN>().to_vec(),
        ))
    }

    pub fn from_bytes(b: Zeroizing<Vec<u8>>) -> Self {
        Self(b)
    }

    /// The raw secret: only to seal it for storage.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The 6-digit code of step `step`.
    pub fn code_at(&self, step: i64) -> u32 {
        // HMAC accepts keys of any length.
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(&(step as u64).to_be_bytes());
        let h = mac.finalize().into_bytes();
        let off = (h[19] & 0x0f) as usize;
        let bin = u32::from_be_bytes([h[off] & 0x7f, h[off + 1], h[off + 2], h[off + 3]]);
        bin % 1_000_000
    }

    /// The step `code` matches at `now_ms` (±1 step), if it is later than
    /// `last_step`, the step of the last code accepted.
    pub fn check(&self, code: &str, now_ms: i64, last_step: i64) -> Option<i64> {
        let code = code.trim();
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let now = now_ms.div_euclid(1000 * STEP_SECS);
        let mut found = None;
        // Every candidate is compared, in constant time, whatever matches.
        for step in [now - 1, now, now + 1] {
            let want = format!("{:06}", self.code_at(step));
            if crypto::ct_eq(want.as_bytes(), code.as_bytes()) && step > last_step {
                found = Some(step);
            }
        }
        found
    }

    /// The `otpauth://` URI an authenticator app reads (as text or QR).
    pub fn uri(&self, issuer: &str, account: &str) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits=6&period={STEP_SECS}",
            pct(issuer),
            pct(account),
            base32(&self.0).as_str(),
            pct(issuer)
        ))
    }
}

/// Percent-encodes everything but unreserved characters.
fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// RFC 4648 base32 without padding.
pub fn base32(data: &[u8]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    let mut buf = 0u64;
    let mut bits = 0;
    for &b in data {
        buf = (buf << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// Decodes RFC 4648 base32 (no padding, case-insensitive).
pub fn base32_decode(s: &str) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::new());
    let mut buf = 0u64;
    let mut bits = 0;
    for c in s.trim_end_matches('=').bytes() {
        let v = BASE32.iter().position(|&x| x == c.to_ascii_uppercase())? as u64;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

/// Ten new recovery codes, `N-XXXXX-XXXXX` (N the slot, 50 random bits).
/// The slot lets a login check one stored hash, not ten.
pub fn new_recovery_codes() -> Vec<Zeroizing<String>> {
    (0..RECOVERY_CODES)
        .map(|i| {
            let r = base32(&crypto::random_array::<7>());
            Zeroizing::new(format!("{i}-{}-{}", &r[..5], &r[5..10]))
        })
        .collect()
}

/// The slot of a recovery code, if `s` has the shape of one.
pub fn recovery_slot(s: &str) -> Option<usize> {
    let b = s.trim().as_bytes();
    if b.len() != 13 || b[1] != b'-' || b[7] != b'-' {
        return None;
    }
    let ok = |r: &[u8]| r.iter().all(|c| BASE32.contains(&c.to_ascii_uppercase()));
    if !(b[0].is_ascii_digit() && ok(&b[2..7]) && ok(&b[8..13])) {
        return None;
    }
    Some((b[0] - b'0') as usize)
}

/// A recovery code as it is hashed (upper case, trimmed).
pub fn normalize_recovery(s: &str) -> Zeroizing<String> {
    Zeroizing::new(s.trim().to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 (the last six of the eight digits).
    #[test]
    fn codes_match_the_rfc_vectors() {
        let s = TotpSecret::from_bytes(Zeroizing::new(b"12345678901234567890".to_vec()));
        for (t, code) in [
            (59i64, 287082u32),
            (1111111109, 81804),
            (1111111111, 50471),
            (1234567890, 5924),
            (2000000000, 279037),
        ] {
            assert_eq!(s.code_at(t / 30), code, "t = {t}");
        }
    }

    #[test]
    fn a_code_is_accepted_once_and_only_near_its_time() {
        let s = TotpSecret::random();
        let now = 1_700_000_000_000i64;
        let step = now / 30_000;
        let code = format!("{:06}", s.code_at(step));
        assert_eq!(s.check(&code, now, 0), Some(step));
        assert_eq!(s.check(&code, now, step), None, "reused");
        assert_eq!(s.check(&code, now + 30_000, 0), Some(step), "one step late");
        assert_eq!(s.check(&code, now + 90_000, 0), None, "three steps late");
        assert_eq!(s.check("12345", now, 0), None);
        assert_eq!(s.check("abcdef", now, 0), None);
    }

    #[test]
    fn base32_and_uri_round_trip() {
        let s = TotpSecret::random();
        let uri = s.uri("Coffre", "system/admin");
        assert!(uri.starts_with("otpauth://totp/Coffre:system%2Fadmin?secret="));
        let secret = uri
            .split("secret=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        assert_eq!(&base32_decode(secret).unwrap()[..], s.expose());
        assert_eq!(base32(b"foobar").as_str(), "MZXW6YTBOI");
    }

    #[test]
    fn recovery_codes_name_their_slot() {
        let codes = new_recovery_codes();
        assert_eq!(codes.len(), 10);
        for (i, c) in codes.iter().enumerate() {
            assert_eq!(recovery_slot(c), Some(i));
            assert_eq!(recovery_slot(&c.to_lowercase()), Some(i));
        }
        assert_eq!(recovery_slot("123456"), None);
        assert_eq!(recovery_slot("1-ABCDE-FGH1J"), None, "1 is not base32");
    }
}
