//! Host-side arrival timestamps carried with a datagram (thesis ch. 6,
//! §6.4 and §6.5.1; notes part D).
//!
//! The relay takes the kernel's receive time of each client datagram and
//! puts it in front of the payload as one record, the way the thesis's host
//! adds one 8-byte record (2 header bytes, 6 payload bytes) to the Xen ring
//! beside each packet. A game server strips the record with [`decode`] and
//! uses the time in it instead of its own clock read after `recvmsg`,
//! which is late by however long the server waited for a CPU.
//!
//! ```text
//! byte 0      0xD7 (TYPE): a shoal arrival-timestamp record
//! byte 1      L: bytes of timestamp that follow (6 or 8)
//! L = 6       u32 seconds since the Unix epoch, big-endian
//!             u16 microseconds >> 4 (16 µs steps, truncated), big-endian
//! L = 8       u64 nanoseconds since the Unix epoch, big-endian
//! byte 2 + L  the client's datagram, unchanged
//! ```
//!
//! A reader skips `2 + L` bytes whatever L is, so a format added later
//! does not break an old server that only wants the payload. The 6-byte
//! form is the thesis's (16 µs is 60 times finer than its 1 ms bound and
//! the whole record is 8 bytes); the 8-byte form keeps nanoseconds for
//! measurements finer than 16 µs.

/// First byte of every record.
pub const TYPE: u8 = 0xD7;
/// Step of the thesis's fraction field: 2^4 µs.
pub const THESIS_STEP_US: u32 = 16;

/// How the arrival time is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// The thesis's 6 bytes: u32 seconds and u16 of 16 µs steps.
    #[default]
    Thesis,
    /// 8 bytes: u64 nanoseconds since the epoch.
    Nanos,
}

impl Format {
    /// Bytes of timestamp after the 2-byte record header.
    pub fn stamp_len(self) -> usize {
        match self {
            Format::Thesis => 6,
            Format::Nanos => 8,
        }
    }

    /// Bytes the whole record adds in front of a payload.
    pub fn header_len(self) -> usize {
        2 + self.stamp_len()
    }

    /// The finest step the format keeps, in nanoseconds.
    pub fn resolution_ns(self) -> u64 {
        match self {
            Format::Thesis => u64::from(THESIS_STEP_US) * 1000,
            Format::Nanos => 1,
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "thesis" | "16us" => Ok(Format::Thesis),
            "ns" | "nanos" => Ok(Format::Nanos),
            other => Err(format!(
                "unknown timestamp format {other:?}: use thesis (6 bytes, 16 µs) or ns (8 bytes)"
            )),
        }
    }
}

/// The thesis's 6-byte form of a time: seconds and a 16 µs fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThesisTime {
    /// Seconds since the epoch, modulo 2^32.
    pub secs: u32,
    /// Microseconds within the second, divided by 16 (0..=62499).
    pub frac: u16,
}

impl ThesisTime {
    /// Reduces (seconds, microseconds) by truncation to 16 µs (notes D.5
    /// item 4: truncating keeps the stamp never later than the arrival).
    pub fn from_secs_micros(secs: u64, micros: u32) -> Self {
        debug_assert!(micros < 1_000_000);
        Self {
            secs: secs as u32,
            frac: (micros.min(999_999) / THESIS_STEP_US) as u16,
        }
    }

    /// Microseconds within the second that the fraction stands for.
    pub fn micros(self) -> u32 {
        u32::from(self.frac) * THESIS_STEP_US
    }
}

/// Why a datagram carries no readable record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StampError {
    /// Shorter than the record it announces.
    #[error("datagram of {0} bytes is shorter than its timestamp record")]
    Short(usize),
    /// The first byte is not [`TYPE`]: not from a shoal relay.
    #[error(
        "datagram does not start with a timestamp record (byte 0 is {0:#04x}, not 0xd7): is it sent through `shoal relay`?"
    )]
    NotStamped(u8),
    /// A record length this version does not read (the payload is still
    /// reachable with [`strip`]).
    #[error("timestamp record of {0} bytes is not a known format (6 or 8)")]
    UnknownFormat(u8),
    /// A fraction above 62499 cannot come from a real microsecond value.
    #[error("timestamp fraction {0} is above 62499")]
    BadFraction(u16),
}

/// An arrival time read from a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Nanoseconds since the epoch (seconds modulo 2^32 for the thesis form).
    pub unix_ns: u64,
    /// The format it came in.
    pub format: Format,
}

/// Writes the record for an arrival at `unix_ns` into `out`, which must
/// hold [`Format::header_len`] bytes; returns the bytes written.
pub fn encode(format: Format, unix_ns: u64, out: &mut [u8]) -> usize {
    let n = format.header_len();
    out[0] = TYPE;
    out[1] = format.stamp_len() as u8;
    match format {
        Format::Thesis => {
            let t = ThesisTime::from_secs_micros(
                unix_ns / 1_000_000_000,
                ((unix_ns % 1_000_000_000) / 1000) as u32,
            );
            out[2..6].copy_from_slice(&t.secs.to_be_bytes());
            out[6..8].copy_from_slice(&t.frac.to_be_bytes());
        }
        Format::Nanos => out[2..10].copy_from_slice(&unix_ns.to_be_bytes()),
    }
    n
}

/// The payload behind the record, whatever its format.
pub fn strip(datagram: &[u8]) -> Result<&[u8], StampError> {
    match datagram {
        [TYPE, len, ..] if datagram.len() >= 2 + usize::from(*len) => {
            Ok(&datagram[2 + usize::from(*len)..])
        }
        [TYPE, ..] | [] => Err(StampError::Short(datagram.len())),
        [b, ..] => Err(StampError::NotStamped(*b)),
    }
}

/// Reads the arrival time and returns it with the payload.
pub fn decode(datagram: &[u8]) -> Result<(Stamp, &[u8]), StampError> {
    let payload = strip(datagram)?;
    let rec = &datagram[2..datagram.len() - payload.len()];
    let stamp = match rec.len() {
        6 => {
            let secs = u32::from_be_bytes([rec[0], rec[1], rec[2], rec[3]]);
            let frac = u16::from_be_bytes([rec[4], rec[5]]);
            if frac > 62_499 {
                return Err(StampError::BadFraction(frac));
            }
            let t = ThesisTime { secs, frac };
            Stamp {
                unix_ns: u64::from(secs) * 1_000_000_000 + u64::from(t.micros()) * 1000,
                format: Format::Thesis,
            }
        }
        8 => Stamp {
            unix_ns: u64::from_be_bytes(rec.try_into().expect("8 bytes")),
            format: Format::Nanos,
        },
        n => return Err(StampError::UnknownFormat(n as u8)),
    };
    Ok((stamp, payload))
}

/// Running error statistics of one timestamping method: mean and
/// percentiles of (stamp − send time), from a log-linear histogram with 1 µs
/// resolution below 1 ms and 1 % above, so a server keeps them for
/// millions of datagrams in a few kilobytes.
#[derive(Debug, Clone, Default)]
pub struct ErrorStats {
    count: u64,
    sum_ns: i128,
    max_ns: i64,
    below_zero: u64,
    buckets: std::collections::BTreeMap<u32, u64>,
}

impl ErrorStats {
    /// Adds one datagram's error (nanoseconds, negative when the stamp is
    /// earlier than the send time, as truncation can make it).
    pub fn add(&mut self, err_ns: i64) {
        self.count += 1;
        self.sum_ns += i128::from(err_ns);
        self.max_ns = if self.count == 1 {
            err_ns
        } else {
            self.max_ns.max(err_ns)
        };
        if err_ns < 0 {
            self.below_zero += 1;
        }
        *self
            .buckets
            .entry(bucket(err_ns.max(0) as u64))
            .or_default() += 1;
    }

    /// Merges another's samples.
    pub fn merge(&mut self, o: &ErrorStats) {
        if o.count == 0 {
            return;
        }
        self.max_ns = if self.count == 0 {
            o.max_ns
        } else {
            self.max_ns.max(o.max_ns)
        };
        self.count += o.count;
        self.sum_ns += o.sum_ns;
        self.below_zero += o.below_zero;
        for (b, n) in &o.buckets {
            *self.buckets.entry(*b).or_default() += n;
        }
    }

    /// Samples added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean in microseconds (0 without samples).
    pub fn mean_us(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64 / 1000.0
        }
    }

    /// Largest sample, microseconds.
    pub fn max_us(&self) -> f64 {
        self.max_ns as f64 / 1000.0
    }

    /// The q-quantile (0..=1) in microseconds, within the bucket's width.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (b, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return bucket_upper_ns(*b) as f64 / 1000.0;
            }
        }
        self.max_us()
    }

    /// The buckets as (index, count), for serialising.
    pub fn buckets(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.buckets.iter().map(|(b, n)| (*b, *n))
    }

    /// Rebuilds from serialised parts (buckets as [`Self::buckets`] gives them).
    pub fn from_parts(
        count: u64,
        sum_ns: i128,
        max_ns: i64,
        buckets: impl IntoIterator<Item = (u32, u64)>,
    ) -> Self {
        let mut s = Self {
            count,
            sum_ns,
            max_ns,
            ..Self::default()
        };
        for (b, n) in buckets {
            *s.buckets.entry(b).or_default() += n;
        }
        s
    }

    /// Sum of the samples, nanoseconds.
    pub fn sum_ns(&self) -> i128 {
        self.sum_ns
    }

    /// Largest sample, nanoseconds.
    pub fn max_ns(&self) -> i64 {
        self.max_ns
    }
}

/// 1 µs buckets to 1 ms, then 100 per decade.
fn bucket(ns: u64) -> u32 {
    let us = ns / 1000;
    if us < 1000 {
        us as u32
    } else {
        1000 + ((us as f64 / 1000.0).log10() * 100.0) as u32
    }
}

fn bucket_upper_ns(b: u32) -> u64 {
    if b < 1000 {
        (u64::from(b) + 1) * 1000
    } else {
        (1000.0 * 10f64.powf(f64::from(b - 1000 + 1) / 100.0)) as u64 * 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn v6_1_thesis_vector() {
        let t = ThesisTime::from_secs_micros(1_234_567_890, 999_999);
        assert_eq!(t.secs, 0x4996_02D2);
        assert_eq!(t.frac, 62_499);
        assert_eq!(t.frac, 0xF423);
        assert_eq!(t.micros(), 999_984);
        let mut buf = [0u8; 8];
        let ns = 1_234_567_890 * 1_000_000_000 + 999_999_000;
        assert_eq!(encode(Format::Thesis, ns, &mut buf), 8);
        assert_eq!(buf, [0xD7, 6, 0x49, 0x96, 0x02, 0xD2, 0xF4, 0x23]);
        let (s, payload) = decode(&buf).unwrap();
        assert!(payload.is_empty());
        assert_eq!(s.unix_ns, 1_234_567_890 * 1_000_000_000 + 999_984_000);
        assert_eq!(ns - s.unix_ns, 15_000, "an error of 15 µs");
    }

    #[test]
    fn v6_2_every_microsecond_fits_and_errs_0_to_15() {
        for us in 0..1_000_000u32 {
            let t = ThesisTime::from_secs_micros(7, us);
            assert!(t.frac <= 62_499);
            let err = us - t.micros();
            assert!(err <= 15, "{us}");
        }
    }

    #[test]
    fn nanos_form_round_trips_with_payload() {
        let mut d = vec![0u8; 10];
        encode(Format::Nanos, 1_700_000_000_123_456_789, &mut d);
        d.extend_from_slice(b"input");
        let (s, p) = decode(&d).unwrap();
        assert_eq!(s.unix_ns, 1_700_000_000_123_456_789);
        assert_eq!(s.format, Format::Nanos);
        assert_eq!(p, b"input");
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        assert_eq!(decode(&[]), Err(StampError::Short(0)));
        assert_eq!(decode(&[0xD7, 6, 1]), Err(StampError::Short(3)));
        assert_eq!(decode(b"hello"), Err(StampError::NotStamped(b'h')));
        assert_eq!(
            decode(&[0xD7, 3, 1, 2, 3, 9]),
            Err(StampError::UnknownFormat(3))
        );
        // An unknown format's payload is still reachable.
        assert_eq!(strip(&[0xD7, 3, 1, 2, 3, 9]), Ok(&[9u8][..]));
        assert_eq!(
            decode(&[0xD7, 6, 0, 0, 0, 0, 0xFF, 0xFF]),
            Err(StampError::BadFraction(0xFFFF))
        );
    }

    #[test]
    fn stats_mean_and_percentiles() {
        let mut s = ErrorStats::default();
        for us in 1..=100 {
            s.add(us * 1000);
        }
        assert_eq!(s.count(), 100);
        assert!((s.mean_us() - 50.5).abs() < 1e-9);
        assert_eq!(s.quantile_us(0.95), 96.0);
        s.add(5_000_000);
        assert!((s.quantile_us(1.0) - 5000.0).abs() / 5000.0 < 0.03);
        let back = ErrorStats::from_parts(s.count(), s.sum_ns(), s.max_ns(), s.buckets());
        assert_eq!(back.quantile_us(0.95), s.quantile_us(0.95));
        assert_eq!(back.mean_us(), s.mean_us());
    }

    proptest! {
        /// V6.2/V6.3: the stamp is never later than the arrival and at
        /// most 15 µs (and a fraction of one) earlier; so a gap between two
        /// arrivals survives within 16 µs.
        #[test]
        fn truncation_error_within_0_15_us(ns in 0u64..(u32::MAX as u64 * 1_000_000_000), gap in 0u64..100_000_000) {
            let mut b = [0u8; 8];
            encode(Format::Thesis, ns, &mut b);
            let (s, _) = decode(&b).unwrap();
            let err = ns - s.unix_ns;
            prop_assert!(err < 16_000, "error {err} ns");
            prop_assert!((ns / 1000 - s.unix_ns / 1000) <= 15);
            encode(Format::Thesis, ns + gap, &mut b);
            let (s2, _) = decode(&b).unwrap();
            let got = s2.unix_ns as i64 - s.unix_ns as i64;
            prop_assert!((got - gap as i64).abs() < 16_000);
        }

        #[test]
        fn decode_never_panics(d in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode(&d);
            let _ = strip(&d);
        }
    }
}
