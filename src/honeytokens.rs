//! Honeytokens: canary records no honest user has a reason to open. Any
//! read, bulk read or find hit on one locks the reader within that call and
//! raises a critical alert.
//!
//! A canary is stored by the ordinary record path (same id form, same
//! encryption, same index entries, same timing), with the field names of an
//! existing record of the tenant and plausible values. What marks it is a
//! keyed tag `HMAC(honeytoken key, tenant ‖ id)` in its own key space: a
//! copy of the data directory does not say which records are canaries.
//!
//! Find hits must never lock an honest user. So an indexed field whose
//! canary value is common (a sex, a blood group, a birth date, a given name)
//! is indexed under a random token instead, which no search can produce;
//! the values an honest search could not hit by chance (a generated family
//! name, a NIR, a phone number, an e-mail) are indexed for real, so a
//! search with a value taken from the canary (a leaked copy) trips it.

use std::collections::{BTreeSet, HashSet};

use parking_lot::RwLock;
use rand::{Rng, seq::IndexedRandom};

use crate::{
    crypto::{self, Context, SecretKey},
    error::Result,
    model::{FieldName, Fields, RecordId, TenantName},
    records::{Records, Written},
    store::{Batch, Space, Storage},
    tenants::Tenant,
};

pub struct Honeytokens {
    store: Storage,
    key: SecretKey,
    tags: RwLock<HashSet<[u8; 32]>>,
}

impl Honeytokens {
    /// Loads the tags of every canary (a few per tenant).
    pub async fn open(store: Storage, key: SecretKey) -> Result<Self> {
        let tags = Self::stored_tags(&store).await?;
        Ok(Self {
            store,
            key,
            tags: RwLock::new(tags),
        })
    }

    async fn stored_tags(store: &Storage) -> Result<HashSet<[u8; 32]>> {
        let mut tags = HashSet::new();
        for (k, _) in store
            .scan_prefix(Space::Honeytokens, b"", usize::MAX)
            .await?
        {
            if let Ok(t) = <[u8; 32]>::try_from(&k[..]) {
                tags.insert(t);
            }
        }
        Ok(tags)
    }

    /// Re-reads the canaries, for the ones another node made (several
    /// nodes on one database re-read them every second).
    pub async fn reload(&self) -> Result<()> {
        let tags = Self::stored_tags(&self.store).await?;
        *self.tags.write() = tags;
        Ok(())
    }

    fn tag(&self, tenant: &TenantName, id: &RecordId) -> [u8; 32] {
        crypto::hmac_sha256(
            &self.key,
            Context::new("coffre/honeytoken/v1")
                .with(tenant.as_str().as_bytes())
                .with(id.as_str().as_bytes())
                .as_bytes(),
        )
    }

    /// Whether `id` is a canary of `tenant`.
    pub fn is_canary(&self, tenant: &TenantName, id: &RecordId) -> bool {
        let tags = self.tags.read();
        !tags.is_empty() && tags.contains(&self.tag(tenant, id))
    }

    /// Makes a canary record in `tenant` and returns its id.
    pub async fn create(&self, tenant: &Tenant, records: &Records) -> Result<Written> {
        let id = RecordId::generate();
        let shape = records
            .sample_shape(tenant)
            .await?
            .unwrap_or_else(default_shape);
        let mut fields = Vec::new();
        let mut decoys = BTreeSet::new();
        for (name, len) in shape {
            let (value, distinctive) = plausible(name.as_str(), len);
            if !distinctive && tenant.indexed.contains(&name) {
                decoys.insert(name.clone());
            }
            fields.push((name.to_string(), value));
        }
        let fields = Fields::parse(fields)?;
        // The tag is durable before the record exists: there is no moment
        // when the canary can be read without tripping.
        let tag = self.tag(&tenant.name, &id);
        self.tags.write().insert(tag);
        let mut b = Batch::new();
        b.put(Space::Honeytokens, tag.to_vec(), Vec::new());
        self.store.commit(b).await?;
        let written = records
            .put_with(tenant, Some(id.clone()), fields, &decoys)
            .await?;
        Ok(written)
    }
}

/// The fields of a record that has none to imitate: the usual identity
/// record of a patient.
pub const DEFAULT_SHAPE: [&str; 10] = [
    "family_name",
    "given_name",
    "birth_date",
    "sex",
    "address",
    "phone",
    "email",
    "nir",
    "blood_group",
    "treating_physician",
];

const SYLLABLES: [&str; 24] = [
    "ker", "lo", "ma", "ri", "gan", "bre", "du", "mon", "val", "ler", "ta", "vin", "bo", "cha",
    "gue", "nel", "ro", "sa", "ti", "ven", "lan", "mor", "quin", "zac",
];
const GIVEN: [&str; 16] = [
    "Camille", "Louis", "Léa", "Gabriel", "Chloé", "Jules", "Manon", "Hugo", "Emma", "Arthur",
    "Jade", "Raphaël", "Louise", "Léo", "Alice", "Paul",
];
const STREETS: [&str; 8] = [
    "rue de la République",
    "avenue Jean Jaurès",
    "rue Victor Hugo",
    "boulevard Pasteur",
    "rue des Lilas",
    "place de la Mairie",
    "chemin des Vignes",
    "rue du Moulin",
];
const CITIES: [&str; 6] = [
    "69002 Lyon",
    "13001 Marseille",
    "31000 Toulouse",
    "44000 Nantes",
    "67000 Strasbourg",
    "33000 Bordeaux",
];

fn family_name(rng: &mut impl Rng) -> String {
    let n = rng.random_range(2..=3);
    let mut s: String = (0..n)
        .map(|_| *SYLLABLES.choose(rng).expect("non-empty"))
        .collect();
    s[..1].make_ascii_uppercase();
    s
}

/// A plausible value for a field called `name` whose stored plaintext is
/// `len` bytes in the record imitated, and whether it is distinctive enough
/// to index for real (no honest search hits it by chance).
fn plausible(name: &str, len: usize) -> (String, bool) {
    let mut rng = rand::rng();
    let given = *GIVEN.choose(&mut rng).expect("non-empty");
    let (v, distinctive) = match name {
        "family_name" | "last_name" | "surname" => (family_name(&mut rng), true),
        "given_name" | "first_name" => (given.to_string(), false),
        "birth_date" | "date_of_birth" => (
            format!(
                "{}-{:02}-{:02}",
                rng.random_range(1935..2015),
                rng.random_range(1..=12),
                rng.random_range(1..=28)
            ),
            false,
        ),
        "sex" | "gender" => (["F", "M"].choose(&mut rng).expect("2").to_string(), false),
        "address" => (
            format!(
                "{} {}, {}",
                rng.random_range(1..200),
                STREETS.choose(&mut rng).expect("non-empty"),
                CITIES.choose(&mut rng).expect("non-empty")
            ),
            false,
        ),
        "phone" | "mobile" => (
            format!("+33 6 {:08}", rng.random_range(0..100_000_000u32)),
            true,
        ),
        "email" => (
            format!(
                "{}.{}{}@example.org",
                given.to_lowercase(),
                family_name(&mut rng).to_lowercase(),
                rng.random_range(10..100)
            ),
            true,
        ),
        "nir" => (nir(&mut rng), true),
        "blood_group" => (
            ["A+", "A-", "B+", "O+", "O-", "AB+"]
                .choose(&mut rng)
                .expect("non-empty")
                .to_string(),
            false,
        ),
        "treating_physician" | "physician" => (format!("Dr {}", family_name(&mut rng)), false),
        _ => {
            // A field we know nothing of: random text of the imitated length.
            const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
            let n = len.clamp(1, 256);
            let s: String = (0..n)
                .map(|_| *ALNUM.choose(&mut rng).expect("non-empty") as char)
                .collect();
            (s, n >= 12)
        }
    };
    (v, distinctive)
}

/// A French social security number (NIR) of valid form: sex, year, month,
/// department, commune, order, and its key `97 − (n mod 97)`.
fn nir(rng: &mut impl Rng) -> String {
    let body = format!(
        "{}{:02}{:02}{:02}{:03}{:03}",
        rng.random_range(1..=2),
        rng.random_range(0..100),
        rng.random_range(1..=12),
        rng.random_range(1..96),
        rng.random_range(1..1000),
        rng.random_range(1..1000)
    );
    let n: u64 = body.parse().expect("13 digits");
    format!("{body}{:02}", 97 - n % 97)
}

/// Field names of a canary that has no record to imitate.
fn default_shape() -> Vec<(FieldName, usize)> {
    DEFAULT_SHAPE
        .iter()
        .map(|n| (FieldName::parse(n).expect("valid names"), 12))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nir_key_is_valid_and_values_fit_their_kind() {
        let mut rng = rand::rng();
        for _ in 0..100 {
            let n = nir(&mut rng);
            assert_eq!(n.len(), 15);
            let body: u64 = n[..13].parse().unwrap();
            let key: u64 = n[13..].parse().unwrap();
            assert_eq!(key, 97 - body % 97);
        }
        let (v, distinctive) = plausible("unknown_field", 20);
        assert_eq!(v.len(), 20);
        assert!(distinctive);
        let (_, distinctive) = plausible("blood_group", 3);
        assert!(!distinctive);
        let (v, _) = plausible("family_name", 0);
        assert!(v.chars().next().unwrap().is_uppercase());
    }
}
