//! Identifier newtypes.

use std::fmt;
use std::str::FromStr;

/// The id of a chunk: the blake3 hash of its plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hashes a plaintext block with plain blake3: the id of an
    /// unencrypted store. Code that stores or looks up chunks uses the
    /// store's hasher instead ([`crate::Store::chunk_id`]).
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

impl FromStr for ChunkId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| format!("bad chunk id '{s}': {e}"))?;
        Ok(ChunkId(out))
    }
}

/// How a store names chunks: the plain blake3 of the plaintext in an
/// unencrypted store, blake3 keyed with a key derived from the data key in
/// an encrypted one (so its ids say nothing about which known data it
/// holds). Every id a store is asked about must come from its own hasher
/// ([`crate::Store::chunk_id`]).
#[derive(Clone)]
pub enum ChunkHasher {
    Plain,
    Keyed(zeroize::Zeroizing<[u8; 32]>),
}

impl ChunkHasher {
    /// The id of a plaintext block.
    pub fn id(&self, data: &[u8]) -> ChunkId {
        match self {
            ChunkHasher::Plain => ChunkId::of(data),
            ChunkHasher::Keyed(k) => ChunkId(*blake3::keyed_hash(k, data).as_bytes()),
        }
    }

    pub fn is_keyed(&self) -> bool {
        matches!(self, ChunkHasher::Keyed(_))
    }
}

impl fmt::Debug for ChunkHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkHasher::Plain => "ChunkHasher::Plain",
            ChunkHasher::Keyed(_) => "ChunkHasher::Keyed(..)",
        })
    }
}

/// The id of a backup. Allocated by the catalog, recorded in the store's
/// manifest, so that a catalog rebuilt from the store gives the same ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct BackupId(pub u64);

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
