//! Workload generators for the Vibra experiments (thesis 3.5.1, 3.5.4;
//! seeds/notes/thesis-ch3-6.md A.6): a World-Cup-'98-like clip matched to
//! Table 3.1 and a YouTube-like video set. Pure and seeded: the same seed
//! gives the same objects and the same requests, for `shoal bench vibra`
//! and anything else that replays them.
//!
//! World Cup: about 4,656 objects and 56 MB; the 8 hottest objects carry
//! about 58 % of the bytes (0.9 x 64 %) and one of them 24 %; all 8 sit in
//! one sub-namespace of the dispatcher's url-hash, and midway the hot set
//! moves to another sub-namespace (the 9 pm game of Fig. 3.5).
//! YouTube: 2,000 videos, Zipf popularity with beta = 0.56 independent of
//! size, sizes scaled to keep the working-set-to-memory ratio.

use serde::Serialize;

/// splitmix64: a small, well-mixed, seedable generator (no dependency).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Exponential with mean `mean`.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f64()).ln()
    }
}

/// One object: its URL path and size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Object {
    /// Origin-form path, e.g. `/english/images/splash_03.gif`.
    pub path: String,
    /// Bytes.
    pub size: u64,
}

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Request {
    /// Seconds from the start.
    pub at: f64,
    /// Index into the trace's objects.
    pub object: usize,
}

/// A generated trace: objects and timed requests.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// What it imitates.
    pub name: String,
    /// Every object.
    pub objects: Vec<Object>,
    /// Requests, in time order.
    pub requests: Vec<Request>,
    /// The sub-namespace holding the hot set before and after it moves.
    pub hot_sub: (usize, usize),
}

impl Trace {
    /// Total bytes of all objects.
    pub fn content_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }
    /// Total bytes requested.
    pub fn requested_bytes(&self) -> u64 {
        self.requests
            .iter()
            .map(|r| self.objects[r.object].size)
            .sum()
    }
    /// Share of the requested bytes per sub-namespace under `sub_of`.
    pub fn byte_shares(&self, n: usize, sub_of: &dyn Fn(&str) -> usize) -> Vec<f64> {
        let mut v = vec![0.0; n];
        for r in &self.requests {
            let o = &self.objects[r.object];
            v[sub_of(&o.path)] += o.size as f64;
        }
        let t: f64 = v.iter().sum();
        v.iter().map(|x| x / t.max(1.0)).collect()
    }
}

/// Settings of [`world_cup`].
#[derive(Debug, Clone)]
pub struct WorldCup {
    /// Objects (Table 3.1: about 4,656).
    pub objects: usize,
    /// Total content bytes (about 56 MB).
    pub content_bytes: u64,
    /// Seconds of trace.
    pub duration: f64,
    /// Mean offered bytes per second.
    pub byte_rate: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for WorldCup {
    fn default() -> Self {
        Self {
            objects: 4656,
            content_bytes: 56_000_000,
            duration: 60.0,
            byte_rate: 7_000_000.0,
            seed: 1998,
        }
    }
}

const SECTIONS: [&str; 8] = [
    "english", "french", "german", "spanish", "japanese", "italian", "prog", "stat",
];

/// A World-Cup-like trace; `sub_of` is the dispatcher's sub-namespace of a
/// path among `n` servers, so the hot set lands in one sub-namespace and
/// then moves to another.
pub fn world_cup(w: &WorldCup, n: usize, sub_of: &dyn Fn(&str) -> usize) -> Trace {
    let mut rng = Rng::new(w.seed);
    // Sizes: heavy-tailed (a Pareto tail over a small-file body), then
    // scaled so the whole set is `content_bytes`.
    let mut sizes: Vec<f64> = (0..w.objects)
        .map(|_| {
            let u = rng.f64().max(1e-9);
            (2000.0 / u.powf(1.0 / 1.3)).min(2_000_000.0)
        })
        .collect();
    let total: f64 = sizes.iter().sum();
    let scale = w.content_bytes as f64 / total;
    for s in &mut sizes {
        *s = (*s * scale).max(200.0);
    }
    let mut objects: Vec<Object> = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| Object {
            path: format!(
                "/{}/images/obj_{i:05}.{}",
                SECTIONS[i % SECTIONS.len()],
                if i % 5 == 0 { "html" } else { "gif" }
            ),
            size: *s as u64,
        })
        .collect();
    // Two hot sets of 8 small objects (splash screens, 8-40 KB), the first
    // in one sub-namespace, the second in another.
    let sub_a = 1 % n.max(1);
    let sub_b = 0;
    let pick = |sub: usize, taken: &[usize]| -> Vec<usize> {
        let mut v = Vec::new();
        for (i, o) in objects.iter().enumerate() {
            if v.len() == 8 {
                break;
            }
            if !taken.contains(&i) && sub_of(&o.path) == sub && i % 5 != 0 {
                v.push(i);
            }
        }
        v
    };
    let hot_a = pick(sub_a, &[]);
    let hot_b = pick(sub_b, &hot_a);
    for (k, i) in hot_a.iter().chain(&hot_b).enumerate() {
        objects[*i].size = 8_000 + (k as u64 % 8) * 4_000;
    }
    // Byte shares: the hottest 24 %, the other seven 34 % together, the
    // rest 42 % over the other objects by Zipf rank (alpha 1).
    let byte_share = |hot: &[usize]| -> Vec<f64> {
        let mut share = vec![0.0; objects.len()];
        let rest: Vec<usize> = (0..objects.len()).filter(|i| !hot.contains(i)).collect();
        let h: f64 = (1..=rest.len()).map(|r| 1.0 / r as f64).sum();
        for (r, i) in rest.iter().enumerate() {
            share[*i] = 0.42 / (r + 1) as f64 / h;
        }
        for (k, i) in hot.iter().enumerate() {
            share[*i] = if k == 0 { 0.24 } else { 0.34 / 7.0 };
        }
        share
    };
    let phases = [byte_share(&hot_a), byte_share(&hot_b)];
    // Request probabilities: byte share over size.
    let cdfs: Vec<Vec<f64>> = phases
        .iter()
        .map(|share| {
            let p: Vec<f64> = share
                .iter()
                .zip(&objects)
                .map(|(s, o)| s / o.size as f64)
                .collect();
            let t: f64 = p.iter().sum();
            let mut acc = 0.0;
            p.iter()
                .map(|x| {
                    acc += x / t;
                    acc
                })
                .collect()
        })
        .collect();
    let mean_size: Vec<f64> = phases
        .iter()
        .zip(&cdfs)
        .map(|(_, cdf)| {
            // Expected bytes per request = sum p_i s_i.
            let mut prev = 0.0;
            cdf.iter()
                .zip(&objects)
                .map(|(c, o)| {
                    let p = c - prev;
                    prev = *c;
                    p * o.size as f64
                })
                .sum()
        })
        .collect();
    let mut requests = Vec::new();
    let mut t = 0.0;
    loop {
        let phase = usize::from(t >= w.duration / 2.0);
        t += rng.exp(mean_size[phase] / w.byte_rate);
        if t >= w.duration {
            break;
        }
        let u = rng.f64();
        let cdf = &cdfs[phase];
        let i = cdf.partition_point(|c| *c < u).min(objects.len() - 1);
        requests.push(Request { at: t, object: i });
    }
    Trace {
        name: "world-cup-like".into(),
        objects,
        requests,
        hot_sub: (sub_a, sub_b),
    }
}

/// Settings of [`youtube`].
#[derive(Debug, Clone)]
pub struct YouTube {
    /// Videos (thesis: 2,000).
    pub videos: usize,
    /// Zipf exponent of popularity (thesis: 0.56).
    pub beta: f64,
    /// Requests (thesis: 4,000).
    pub requests: usize,
    /// Mean video size, bytes: the thesis's 12 GB over 2,000 videos is
    /// 6 MB with 768 MB per server; scale it with the memory per server.
    pub mean_size: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for YouTube {
    fn default() -> Self {
        Self {
            videos: 2000,
            beta: 0.56,
            requests: 4000,
            mean_size: 6e6,
            seed: 2007,
        }
    }
}

/// A YouTube-like set replayed closed-loop (request times are 0: as fast
/// as the clients go). Popularity by Zipf rank, independent of size; IDs
/// are random in the URL, as the thesis's.
pub fn youtube(y: &YouTube) -> Trace {
    let mut rng = Rng::new(y.seed);
    let objects: Vec<Object> = (0..y.videos)
        .map(|i| Object {
            path: format!("/watch/{:016x}.flv", rng.next_u64() ^ i as u64),
            // Exponential sizes around the mean, at least 100 KB.
            size: rng.exp(y.mean_size).max(100_000.0) as u64,
        })
        .collect();
    let w: Vec<f64> = (1..=y.videos).map(|r| (r as f64).powf(-y.beta)).collect();
    let t: f64 = w.iter().sum();
    let mut acc = 0.0;
    let cdf: Vec<f64> = w
        .iter()
        .map(|x| {
            acc += x / t;
            acc
        })
        .collect();
    let requests = (0..y.requests)
        .map(|_| {
            let u = rng.f64();
            Request {
                at: 0.0,
                object: cdf.partition_point(|c| *c < u).min(y.videos - 1),
            }
        })
        .collect();
    Trace {
        name: "youtube-like".into(),
        objects,
        requests,
        hot_sub: (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::select::HashFn;

    fn sub4(p: &str) -> usize {
        HashFn::Xxh3.reduce(HashFn::Xxh3.hash(p.as_bytes()), 4)
    }

    #[test]
    fn world_cup_matches_table_3_1_in_shape() {
        let t = world_cup(&WorldCup::default(), 4, &sub4);
        assert_eq!(t.objects.len(), 4656);
        let mb = t.content_bytes() as f64 / 1e6;
        assert!((54.0..58.0).contains(&mb), "{mb} MB");
        // The hot sub-namespace carries most bytes in each half.
        let half = t.requests.partition_point(|r| r.at < 30.0);
        let first = Trace {
            requests: t.requests[..half].to_vec(),
            ..t.clone()
        };
        let second = Trace {
            requests: t.requests[half..].to_vec(),
            ..t.clone()
        };
        let a = first.byte_shares(4, &sub4);
        let b = second.byte_shares(4, &sub4);
        assert!(a[t.hot_sub.0] > 0.55, "{a:?}");
        assert!(b[t.hot_sub.1] > 0.55, "{b:?}");
        // The hottest object about 24 % of the bytes, the top 8 about 58 %.
        let mut by_obj = vec![0u64; t.objects.len()];
        for r in &first.requests {
            by_obj[r.object] += t.objects[r.object].size;
        }
        let total: u64 = by_obj.iter().sum();
        by_obj.sort_unstable_by(|a, b| b.cmp(a));
        let top1 = by_obj[0] as f64 / total as f64;
        let top8 = by_obj[..8].iter().sum::<u64>() as f64 / total as f64;
        assert!((0.20..0.28).contains(&top1), "{top1}");
        assert!((0.53..0.63).contains(&top8), "{top8}");
        // Offered about the asked byte rate.
        let rate = t.requested_bytes() as f64 / 60.0;
        assert!((rate / 7e6 - 1.0).abs() < 0.15, "{rate}");
    }

    #[test]
    fn youtube_popularity_is_zipf_and_the_same_seed_gives_the_same_trace() {
        let y = YouTube::default();
        let a = youtube(&y);
        assert_eq!(a.objects.len(), 2000);
        assert_eq!(a.requests.len(), 4000);
        let b = youtube(&y);
        assert_eq!(a.requests, b.requests);
        let top = a.requests.iter().filter(|r| r.object == 0).count() as f64;
        let tenth = a.requests.iter().filter(|r| r.object == 9).count() as f64;
        // Zipf 0.56: rank 1 is 10^0.56 = 3.6 times rank 10 (noisy).
        assert!(top / tenth.max(1.0) > 1.8, "{top} vs {tenth}");
    }
}
