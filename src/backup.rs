//! The backup file: one consistent snapshot of a vault, the same whatever
//! the storage backend (a backup made on sled restores into PostgreSQL and
//! back).
//!
//! ```text
//! "COFFRE-BACKUP\n" ‖ format u32 ‖ manifest length u32 ‖ manifest (clear)
//! frames:  length u32 (> 0) ‖ AES-256-GCM(nonce ‖ ciphertext ‖ tag)
//! end:     0u32 ‖ frames u64 ‖ entries u64 ‖ HMAC-SHA256 of every byte before
//! ```
//!
//! The manifest is readable without the key (integers little-endian): the
//! format, creation time, the audit head (seq, hash) the snapshot holds,
//! counts per tenant and per key space, and the master key's check value,
//! so that a backup names the key it needs. Everything else is encrypted:
//! the entries (the key store file as it was, every stored key and value
//! of every space but sessions, the trail's segment headers and frames) in
//! frames of about 256 KiB, each sealed under a key derived from the master
//! key and the file's random salt, with the manifest's hash and the frame's
//! number as associated data. The HMAC at the end (under another key
//! derived the same way) covers the whole file, manifest included: one
//! byte changed anywhere, a frame dropped, reordered or cut off, and the
//! file is refused. Writer and reader hold one frame at a time: constant
//! memory whatever the vault's size.

use std::io::Read;

use prost::Message;

use crate::{
    crypto::{self, Aead256, MacStream, SecretKey},
    keys::{MasterKey, check_value_id, key_check_value},
};

/// The version of the backup file format.
pub const BACKUP_FORMAT: u32 = 1;
const MAGIC: &[u8; 14] = b"COFFRE-BACKUP\n";
/// Plaintext gathered before a frame is sealed.
const FRAME_TARGET: usize = 256 << 10;
/// A frame longer than this is damage (an audit frame is at most 64 MiB).
const FRAME_MAX: u32 = 96 << 20;
/// Output handed out at most this much at a time (one gRPC message).
pub const CHUNK_MAX: usize = 1 << 20;
const MANIFEST_MAX: u32 = 16 << 20;

/// What a backup holds, readable without the key.
#[derive(Clone, PartialEq, Message)]
pub struct Manifest {
    #[prost(uint32, tag = "1")]
    pub format: u32,
    #[prost(int64, tag = "2")]
    pub created_unix_ms: i64,
    #[prost(string, tag = "3")]
    pub coffre_version: String,
    /// The backend it was taken from (any restores into any).
    #[prost(string, tag = "4")]
    pub backend: String,
    /// The master key's check value (`keys::key_check_value`).
    #[prost(bytes = "vec", tag = "5")]
    pub key_check: Vec<u8>,
    /// Random per file: its keys are derived from it.
    #[prost(bytes = "vec", tag = "6")]
    pub salt: Vec<u8>,
    /// The last audit event the snapshot holds; every write whose event is
    /// at or before it, and none after.
    #[prost(uint64, tag = "7")]
    pub audit_head_seq: u64,
    #[prost(bytes = "vec", tag = "8")]
    pub audit_head_hash: Vec<u8>,
    /// The first event the file holds (after retention).
    #[prost(uint64, tag = "9")]
    pub audit_first_seq: u64,
    #[prost(message, repeated, tag = "10")]
    pub tenants: Vec<TenantCounts>,
    #[prost(message, repeated, tag = "11")]
    pub spaces: Vec<SpaceCount>,
    /// Plaintext bytes of all entries, for progress bars.
    #[prost(uint64, tag = "12")]
    pub bytes: u64,
    /// How many tenants the shred list beside the master key had ever
    /// named when the backup was made, and its MAC: a restore refuses a
    /// list with fewer (older than the backup). Absent in backups of
    /// earlier releases.
    #[prost(uint64, optional, tag = "13")]
    pub shred_list_count: Option<u64>,
    #[prost(bytes = "vec", tag = "14")]
    pub shred_list_mac: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TenantCounts {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub records: u64,
    #[prost(uint64, tag = "3")]
    pub principals: u64,
    #[prost(uint64, tag = "4")]
    pub secrets: u64,
    #[prost(uint64, tag = "5")]
    pub index_entries: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct SpaceCount {
    #[prost(uint32, tag = "1")]
    pub space: u32,
    #[prost(uint64, tag = "2")]
    pub entries: u64,
}

impl Manifest {
    /// Store entries of all spaces.
    pub fn store_entries(&self) -> u64 {
        self.spaces.iter().map(|s| s.entries).sum()
    }

    /// The short form of the master key check value it was made under.
    pub fn key_id(&self) -> String {
        check_value_id(&self.key_check)
    }
}

/// One item of a backup.
pub enum Entry {
    /// The key store file as it was at the cut (wrapped keys, MAC'd under
    /// the master key).
    Keyring(Vec<u8>),
    /// One stored key and value of a space (`store::Space` as a byte).
    Store {
        space: u8,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// The header of an audit segment; the frames after it are its own.
    TrailSegment(Vec<u8>),
    /// One audit frame, as in the segment file.
    TrailFrame(Vec<u8>),
}

const KIND_KEYRING: u8 = 1;
const KIND_STORE: u8 = 2;
const KIND_SEGMENT: u8 = 3;
const KIND_FRAME: u8 = 4;

/// Why a backup file is refused. One line each; none carries a key or a
/// value.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a Coffre backup file")]
    NotABackup,
    #[error(
        "backup format {0} is newer than this coffre reads ({BACKUP_FORMAT}): use a newer coffre"
    )]
    Newer(u32),
    #[error(
        "made under another master key: it needs the key with check value {needed}, and the key given has {given} (keep old master keys escrowed as long as their backups)"
    )]
    WrongKey { needed: String, given: String },
    #[error("the file is truncated: it ends before its end marker, so it is not a complete backup")]
    Truncated,
    #[error("the file was changed or damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    Io(String),
}

impl From<std::io::Error> for BackupError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            BackupError::Truncated
        } else {
            BackupError::Io(e.to_string())
        }
    }
}

/// A file's two keys, from the backup root key and its salt.
struct FileKeys {
    enc: Aead256,
    mac: SecretKey,
}

impl FileKeys {
    fn derive(root: &SecretKey, salt: &[u8]) -> Self {
        let salt = hex::encode(salt);
        Self {
            enc: crypto::derive_key(root, &format!("backup/{salt}/enc")).aead(),
            mac: crypto::derive_key(root, &format!("backup/{salt}/mac")),
        }
    }
}

fn frame_aad(manifest_hash: &[u8; 32], index: u64) -> Vec<u8> {
    crypto::Context::new("coffre/backup/v1")
        .with(manifest_hash)
        .with(&index.to_le_bytes())
        .as_bytes()
        .to_vec()
}

/// Encodes a backup: feed it entries, take its bytes as they are ready.
pub struct Writer {
    keys: FileKeys,
    manifest_hash: [u8; 32],
    mac: MacStream,
    plain: zeroize::Zeroizing<Vec<u8>>,
    out: Vec<u8>,
    frames: u64,
    entries: u64,
}

impl Writer {
    /// Starts a file with `manifest` (its salt and format are set here)
    /// under the backup root key `root` (`Keyring::backup_root`).
    pub fn new(root: &SecretKey, mut manifest: Manifest) -> Self {
        manifest.format = BACKUP_FORMAT;
        manifest.salt = crypto::random_array::<32>().to_vec();
        let keys = FileKeys::derive(root, &manifest.salt);
        let body = manifest.encode_to_vec();
        let mut out = Vec::with_capacity(FRAME_TARGET + 1024);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&BACKUP_FORMAT.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let mut mac = MacStream::new(&keys.mac);
        mac.update(&out);
        Self {
            keys,
            manifest_hash: crypto::sha256(&body),
            mac,
            plain: zeroize::Zeroizing::new(Vec::with_capacity(FRAME_TARGET + 1024)),
            out,
            frames: 0,
            entries: 0,
        }
    }

    fn entry(&mut self, kind: u8, parts: &[&[u8]]) {
        self.plain.push(kind);
        for p in parts {
            self.plain
                .extend_from_slice(&(p.len() as u32).to_le_bytes());
            self.plain.extend_from_slice(p);
        }
        self.entries += 1;
        if self.plain.len() >= FRAME_TARGET {
            self.seal_frame();
        }
    }

    pub fn keyring(&mut self, bytes: &[u8]) {
        self.entry(KIND_KEYRING, &[bytes]);
    }

    pub fn store(&mut self, space: u8, key: &[u8], value: &[u8]) {
        self.entry(KIND_STORE, &[&[space], key, value]);
    }

    pub fn trail_segment(&mut self, header: &[u8]) {
        self.entry(KIND_SEGMENT, &[header]);
    }

    pub fn trail_frame(&mut self, raw: &[u8]) {
        self.entry(KIND_FRAME, &[raw]);
    }

    fn seal_frame(&mut self) {
        if self.plain.is_empty() {
            return;
        }
        let sealed = self
            .keys
            .enc
            .seal(&frame_aad(&self.manifest_hash, self.frames), &self.plain);
        self.plain.clear();
        let at = self.out.len();
        self.out
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        self.out.extend_from_slice(&sealed);
        self.mac.update(&self.out[at..]);
        self.frames += 1;
    }

    /// Bytes ready to send (at most [`CHUNK_MAX`]), if any.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            return None;
        }
        let n = self.out.len().min(CHUNK_MAX);
        let rest = self.out.split_off(n);
        Some(std::mem::replace(&mut self.out, rest))
    }

    /// Seals what is left and appends the end: the last bytes, in pieces of
    /// at most [`CHUNK_MAX`].
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.seal_frame();
        let at = self.out.len();
        self.out.extend_from_slice(&0u32.to_le_bytes());
        self.out.extend_from_slice(&self.frames.to_le_bytes());
        self.out.extend_from_slice(&self.entries.to_le_bytes());
        self.mac.update(&self.out[at..]);
        let mac = std::mem::replace(&mut self.mac, MacStream::new(&self.keys.mac)).finish();
        self.out.extend_from_slice(&mac);
        let mut pieces = Vec::new();
        while let Some(p) = self.take() {
            pieces.push(p);
        }
        pieces
    }
}

/// Reads a file's manifest without any key.
pub fn read_manifest(r: &mut impl Read) -> Result<(Manifest, Vec<u8>), BackupError> {
    let mut head = [0u8; MAGIC.len() + 8];
    r.read_exact(&mut head).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => BackupError::NotABackup,
        _ => e.into(),
    })?;
    if &head[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let format = u32::from_le_bytes(head[14..18].try_into().expect("4 bytes"));
    if format > BACKUP_FORMAT {
        return Err(BackupError::Newer(format));
    }
    if format != BACKUP_FORMAT {
        return Err(BackupError::NotABackup);
    }
    let len = u32::from_le_bytes(head[18..22].try_into().expect("4 bytes"));
    if len > MANIFEST_MAX {
        return Err(BackupError::Damaged("impossible manifest length".into()));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    let manifest = Manifest::decode(&body[..])
        .map_err(|_| BackupError::Damaged("the manifest does not parse".into()))?;
    let mut all = head.to_vec();
    all.extend_from_slice(&body);
    Ok((manifest, all))
}

/// Decodes a backup, authenticating each frame as it goes and the whole
/// file at its end: [`Reader::next_entry`] answers `None` only once the end's
/// MAC holds. Entries read before a failure must be thrown away.
pub struct Reader<R: Read> {
    r: R,
    manifest: Manifest,
    keys: FileKeys,
    manifest_hash: [u8; 32],
    mac: MacStream,
    plain: zeroize::Zeroizing<Vec<u8>>,
    pos: usize,
    frames: u64,
    entries: u64,
    bytes: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Reads the manifest and checks that `master` is the key the backup
    /// was made under.
    pub fn open(mut r: R, master: &MasterKey) -> Result<Self, BackupError> {
        let (manifest, head) = read_manifest(&mut r)?;
        let given = key_check_value(master);
        if !crypto::ct_eq(&given, &manifest.key_check) {
            return Err(BackupError::WrongKey {
                needed: manifest.key_id(),
                given: check_value_id(&given),
            });
        }
        let keys = FileKeys::derive(&master.backup_root(), &manifest.salt);
        let mut mac = MacStream::new(&keys.mac);
        mac.update(&head);
        let body_len = head.len() - MAGIC.len() - 8;
        let manifest_hash = crypto::sha256(&head[head.len() - body_len..]);
        Ok(Self {
            r,
            manifest,
            keys,
            manifest_hash,
            mac,
            plain: zeroize::Zeroizing::new(Vec::new()),
            pos: 0,
            frames: 0,
            entries: 0,
            bytes: head.len() as u64,
            done: false,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Bytes of the file read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), BackupError> {
        self.r.read_exact(buf)?;
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Reads the next frame into `plain`; false at the (authenticated) end.
    fn next_frame(&mut self) -> Result<bool, BackupError> {
        let mut len = [0u8; 4];
        self.read_exact(&mut len)?;
        self.mac.update(&len);
        let len = u32::from_le_bytes(len);
        if len == 0 {
            let mut end = [0u8; 16 + 32];
            self.read_exact(&mut end)?;
            self.mac.update(&end[..16]);
            let mac = std::mem::replace(&mut self.mac, MacStream::new(&self.keys.mac)).finish();
            if !crypto::ct_eq(&mac, &end[16..]) {
                return Err(BackupError::Damaged("its MAC does not match".into()));
            }
            let frames = u64::from_le_bytes(end[..8].try_into().expect("8 bytes"));
            let entries = u64::from_le_bytes(end[8..16].try_into().expect("8 bytes"));
            if frames != self.frames || entries != self.entries {
                return Err(BackupError::Damaged("frames or entries missing".into()));
            }
            let mut extra = [0u8; 1];
            if self.r.read(&mut extra)? != 0 {
                return Err(BackupError::Damaged("bytes after its end".into()));
            }
            return Ok(false);
        }
        if len > FRAME_MAX {
            return Err(BackupError::Damaged(format!(
                "impossible frame length at byte {}",
                self.bytes - 4
            )));
        }
        let mut sealed = vec![0u8; len as usize];
        self.read_exact(&mut sealed)?;
        self.mac.update(&sealed);
        self.plain = self
            .keys
            .enc
            .open(&frame_aad(&self.manifest_hash, self.frames), &sealed)
            .map_err(|_| {
                BackupError::Damaged(format!(
                    "frame {} (ending at byte {}) fails authentication",
                    self.frames, self.bytes
                ))
            })?;
        self.pos = 0;
        self.frames += 1;
        Ok(true)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], BackupError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.plain.len())
            .ok_or_else(|| BackupError::Damaged("an entry runs past its frame".into()))?;
        let s = &self.plain[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn part(&mut self) -> Result<Vec<u8>, BackupError> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
        Ok(self.take(len as usize)?.to_vec())
    }

    /// The next entry; `None` once the whole file is authenticated.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, BackupError> {
        if self.done {
            return Ok(None);
        }
        while self.pos >= self.plain.len() {
            if !self.next_frame()? {
                self.done = true;
                return Ok(None);
            }
        }
        let kind = self.take(1)?[0];
        self.entries += 1;
        Ok(Some(match kind {
            KIND_KEYRING => Entry::Keyring(self.part()?),
            KIND_STORE => {
                let space = self.part()?;
                let [space] = space[..] else {
                    return Err(BackupError::Damaged("bad store entry".into()));
                };
                Entry::Store {
                    space,
                    key: self.part()?,
                    value: self.part()?,
                }
            }
            KIND_SEGMENT => Entry::TrailSegment(self.part()?),
            KIND_FRAME => Entry::TrailFrame(self.part()?),
            _ => return Err(BackupError::Damaged("unknown entry kind".into())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(master: &MasterKey) -> Vec<u8> {
        let mut w = Writer::new(
            &master.backup_root(),
            Manifest {
                key_check: key_check_value(master).to_vec(),
                audit_head_seq: 7,
                ..Default::default()
            },
        );
        let mut out = Vec::new();
        w.keyring(b"ring");
        for i in 0..3000u32 {
            w.store(6, &i.to_be_bytes(), &[7u8; 200]);
            while let Some(p) = w.take() {
                out.extend(p);
            }
        }
        w.trail_segment(b"seg");
        w.trail_frame(b"frame");
        for p in w.finish() {
            out.extend(p);
        }
        out
    }

    fn read_all(bytes: &[u8], master: &MasterKey) -> Result<u64, BackupError> {
        let mut r = Reader::open(bytes, master)?;
        let mut n = 0;
        while r.next_entry()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    #[test]
    fn a_file_reads_back_and_any_change_is_refused() {
        let master = MasterKey::from_secret(SecretKey::random());
        let file = sample(&master);
        assert_eq!(read_all(&file, &master).unwrap(), 3003);
        assert_eq!(read_manifest(&mut &file[..]).unwrap().0.audit_head_seq, 7);
        for at in [20, 40, file.len() / 2, file.len() - 40, file.len() - 1] {
            let mut bad = file.clone();
            bad[at] ^= 1;
            assert!(read_all(&bad, &master).is_err(), "flip at {at} accepted");
        }
        assert!(matches!(
            read_all(&file[..file.len() - 10], &master),
            Err(BackupError::Truncated)
        ));
        let mut longer = file.clone();
        longer.push(0);
        assert!(read_all(&longer, &master).is_err());
        let other = MasterKey::from_secret(SecretKey::random());
        assert!(matches!(
            read_all(&file, &other),
            Err(BackupError::WrongKey { .. })
        ));
    }
}
