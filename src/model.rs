//! Parsed input: names, ids, purposes and records that already satisfy the
//! limits of input (docs/api.md), so the core never sees unchecked strings. A failed
//! parse says which rule was broken, never the rejected value.

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use crate::error::Error;

pub const MAX_VALUE_BYTES: usize = 64 * 1024;
pub const MAX_FIELDS: usize = 256;
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
pub const MAX_ID_BYTES: usize = 128;
pub const MAX_PURPOSE_BYTES: usize = 256;
pub const MAX_BULK_IDS: usize = 1000;
pub const MIN_PASSWORD_CHARS: usize = 12;
pub const MAX_PASSWORD_CHARS: usize = 1024;
/// The tenant of administrators (and of auditors who see every tenant).
pub const SYSTEM_TENANT: &str = "system";

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// `[a-z][a-z0-9_]{0,63}`
    FieldName
);
string_newtype!(
    /// `[a-z][a-z0-9_-]{0,63}`
    TenantName
);
string_newtype!(
    /// `[a-z0-9][a-z0-9._@-]{0,127}`
    Username
);
string_newtype!(
    /// 1 to 128 bytes of `[A-Za-z0-9._:-]`: safe in logs and audit lines.
    RecordId
);
string_newtype!(
    /// Why a record is read; at most 256 bytes, no control characters.
    Purpose
);

fn lower_word(s: &str, max: usize, extra: &[u8]) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_lowercase()
        && b[1..].iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || extra.contains(c)
        })
}

impl FieldName {
    pub fn parse(s: &str) -> Result<Self, Error> {
        if lower_word(s, 64, &[]) {
            Ok(Self(s.to_string()))
        } else {
            Err(invalid("field names must match [a-z][a-z0-9_]{0,63}"))
        }
    }
}

impl TenantName {
    pub fn parse(s: &str) -> Result<Self, Error> {
        if lower_word(s, 64, b"-") {
            Ok(Self(s.to_string()))
        } else {
            Err(invalid("tenant names must match [a-z][a-z0-9_-]{0,63}"))
        }
    }

    pub fn system() -> Self {
        Self(SYSTEM_TENANT.into())
    }

    pub fn is_system(&self) -> bool {
        self.0 == SYSTEM_TENANT
    }
}

impl Username {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._@-".contains(c));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(invalid("usernames must match [a-z0-9][a-z0-9._@-]{0,127}"))
        }
    }
}

impl RecordId {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let b = s.as_bytes();
        if b.is_empty() {
            return Err(invalid("a record id is required"));
        }
        if b.len() > MAX_ID_BYTES {
            return Err(invalid("record ids are at most 128 bytes"));
        }
        if !b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c))
        {
            return Err(invalid("record ids use only A-Z a-z 0-9 . _ : -"));
        }
        Ok(Self(s.to_string()))
    }

    /// A fresh server-made id (UUID v4).
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
}

impl Purpose {
    /// An optional purpose: empty is allowed.
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.len() > MAX_PURPOSE_BYTES {
            return Err(invalid("purpose is at most 256 bytes"));
        }
        if s.chars().any(char::is_control) {
            return Err(invalid("purpose must not contain control characters"));
        }
        Ok(Self(s.to_string()))
    }

    /// A purpose that must be given.
    pub fn parse_required(s: &str) -> Result<Self, Error> {
        if s.trim().is_empty() {
            return Err(invalid("purpose is required"));
        }
        Self::parse(s)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A principal's role. Only clinicians and services touch records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Clinician,
    Service,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Clinician => "clinician",
            Role::Service => "service",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().trim_start_matches("role_") {
            "admin" => Ok(Role::Admin),
            "clinician" => Ok(Role::Clinician),
            "service" => Ok(Role::Service),
            "auditor" => Ok(Role::Auditor),
            _ => Err(invalid("role must be admin, clinician, service or auditor")),
        }
    }

    pub fn reads_records(self) -> bool {
        matches!(self, Role::Clinician | Role::Service)
    }
}

/// A password as received: held in memory that zeroizes, never printed.
pub struct Password(Zeroizing<String>);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Password {
    /// Any string, for checking against a stored hash (length-capped so a
    /// huge input cannot cost more than a normal one).
    pub fn candidate(s: String) -> Result<Self, Error> {
        let s = Zeroizing::new(s);
        if s.chars().count() > MAX_PASSWORD_CHARS {
            return Err(invalid("passwords are at most 1024 characters"));
        }
        Ok(Self(s))
    }

    /// A new password: ASVS 5.0 §6.2 length and strength rules. The message
    /// says why a password is refused, without repeating it.
    pub fn new_checked(s: String, context: &[&str]) -> Result<Self, Error> {
        let s = Zeroizing::new(s);
        let n = s.chars().count();
        if n < MIN_PASSWORD_CHARS {
            return Err(invalid("password too short: at least 12 characters"));
        }
        if n > MAX_PASSWORD_CHARS {
            return Err(invalid("password too long: at most 1024 characters"));
        }
        // zxcvbn's cost grows with length; a long prefix decides strength.
        let head: Zeroizing<String> = Zeroizing::new(s.chars().take(100).collect());
        let entropy = zxcvbn::zxcvbn(&head, context);
        if (entropy.score() as u8) < 3 {
            let why = entropy
                .feedback()
                .and_then(|f| f.warning())
                .map(|w| w.to_string())
                .unwrap_or_else(|| "it is too easy to guess".to_string());
            return Err(invalid(format!(
                "password too weak ({}); use a longer passphrase of unrelated words",
                why.trim_end_matches('.')
            )));
        }
        Ok(Self(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A record's fields as received, checked against every input limit.
pub struct Fields(pub BTreeMap<FieldName, Zeroizing<String>>);

impl Fields {
    pub fn parse(raw: impl IntoIterator<Item = (String, String)>) -> Result<Self, Error> {
        let mut out = BTreeMap::new();
        let mut total = 0usize;
        for (name, value) in raw {
            let value = Zeroizing::new(value);
            let name = FieldName::parse(&name)?;
            if value.len() > MAX_VALUE_BYTES {
                return Err(invalid(format!("field {name}: values are at most 64 KiB")));
            }
            total += name.as_str().len() + value.len();
            out.insert(name, value);
            if out.len() > MAX_FIELDS {
                return Err(invalid("a record has at most 256 fields"));
            }
        }
        if total > MAX_RECORD_BYTES {
            return Err(invalid("a record is at most 1 MiB"));
        }
        Ok(Self(out))
    }
}

/// Parses a list of field names (a projection), refusing duplicates.
pub fn parse_field_list(raw: &[String]) -> Result<Vec<FieldName>, Error> {
    if raw.len() > MAX_FIELDS {
        return Err(invalid("at most 256 fields may be asked for"));
    }
    let mut v = raw
        .iter()
        .map(|s| FieldName::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    v.sort();
    v.dedup();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec() {
        assert!(FieldName::parse("nir").is_ok());
        assert!(FieldName::parse("a_1").is_ok());
        assert!(FieldName::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "1a", "A", "a-b", "é", &"a".repeat(65)] {
            assert!(FieldName::parse(bad).is_err(), "{bad}");
        }
        assert!(RecordId::parse(&"x".repeat(128)).is_ok());
        assert!(RecordId::parse(&"x".repeat(129)).is_err());
        assert!(RecordId::parse("a\nb").is_err());
        assert!(Purpose::parse_required("").is_err());
        assert!(Purpose::parse(&"p".repeat(257)).is_err());
    }

    #[test]
    fn weak_passwords_are_refused_with_a_reason() {
        let e = Password::new_checked("short".into(), &[]).unwrap_err();
        assert!(e.to_string().contains("at least 12"));
        let e = Password::new_checked("password1234".into(), &[]).unwrap_err();
        assert!(e.to_string().contains("too weak"), "{e}");
        assert!(!e.to_string().contains("password1234"));
        assert!(Password::new_checked("correct horse battery staple 42".into(), &[]).is_ok());
    }

    #[test]
    fn messages_with_secrets_print_redacted() {
        use crate::pb;
        let login = pb::LoginRequest {
            otp: Default::default(),
            tenant: "t".into(),
            username: "u".into(),
            password: "hunter2 hunter2".into(),
        };
        let rec = pb::Record {
            id: "r".into(),
            fields: [("nir".to_string(), "185077512345678".to_string())].into(),
            version: 1,
        };
        let shown = format!(
            "{login:?} {rec:?} {:?}",
            Password::candidate("pw-x".into()).unwrap()
        );
        for secret in ["hunter2", "185077512345678", "pw-x"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn record_limits() {
        let big = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(Fields::parse([("a".to_string(), big)]).is_err());
        let many = (0..=MAX_FIELDS).map(|i| (format!("f{i}"), String::new()));
        assert!(Fields::parse(many).is_err());
        let heavy = (0..20).map(|i| (format!("f{i}"), "v".repeat(60 * 1024)));
        assert!(Fields::parse(heavy).is_err());
        let e = Fields::parse([("a".to_string(), "v".repeat(MAX_VALUE_BYTES + 1))])
            .err()
            .unwrap();
        assert!(!e.to_string().contains("vvv"));
    }
}
