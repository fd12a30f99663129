//! Hash functions for URL hashing and their reduction to N sub-namespaces.

use md5::Digest as _;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// A hash function over object names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HashFn {
    /// Sum of the character codes (thesis 3.4.3), reduced modulo N.
    Charsum,
    /// MD5, first 8 bytes of the digest, big-endian.
    Md5,
    /// SHA-1, first 8 bytes of the digest, big-endian.
    Sha1,
    /// XXH3-64.
    Xxh3,
}

impl HashFn {
    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            HashFn::Charsum => "charsum",
            HashFn::Md5 => "md5",
            HashFn::Sha1 => "sha1",
            HashFn::Xxh3 => "xxh3",
        }
    }

    /// Hashes bytes to 64 bits.
    pub fn hash(self, s: &[u8]) -> u64 {
        match self {
            HashFn::Charsum => s.iter().map(|&c| u64::from(c)).sum(),
            HashFn::Md5 => first_u64(&md5::Md5::digest(s)),
            HashFn::Sha1 => first_u64(&sha1::Sha1::digest(s)),
            HashFn::Xxh3 => xxhash_rust::xxh3::xxh3_64(s),
        }
    }

    /// Maps a hash value to one of `n` sub-namespaces (`n` > 0).
    ///
    /// Charsum values are small sums, so they are reduced modulo `n` as in the
    /// thesis (this is what makes "prog"/"stat" collide at N=4). The 64-bit
    /// hashes are reduced by range, `floor(h * n / 2^64)`: the namespace is cut
    /// into `n` contiguous equal slices, which is the model behind the thesis's
    /// naive-rehash figures (4.3.3: 50 % worst-case loss at every N), and it
    /// costs a multiplication instead of a division.
    pub fn reduce(self, h: u64, n: usize) -> usize {
        debug_assert!(n > 0);
        let n = n.max(1);
        match self {
            HashFn::Charsum => (h % n as u64) as usize,
            _ => ((u128::from(h) * n as u128) >> 64) as usize,
        }
    }
}

fn first_u64(d: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// A 64-bit finalizer (splitmix64) that spreads weak hashes (charsum) over a ring.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl fmt::Display for HashFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HashFn {
    type Err = super::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [HashFn::Charsum, HashFn::Md5, HashFn::Sha1, HashFn::Xxh3]
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| super::UnknownName {
                what: "hash function",
                given: s.to_string(),
                expected: "charsum, md5, sha1, xxh3",
            })
    }
}
