//! SMON's analysis (section IV) as functions, so the simulator and the tests
//! compare measurements with the formulas rather than with numbers.

/// The expected deployed fraction after `r` rounds from one peer among `n`
/// machines: `Y_r = 1 / (1 + n e^-r)`, the logistic solution of
/// `dY/dr = Y (1 - Y)`.
pub fn y_r(n: f64, r: f64) -> f64 {
    1.0 / (1.0 + n * (-r).exp())
}

/// The rounds after which `Y_r` reaches `y`: `ln(n y / (1 - y))`
/// (`ln n` for one half, `ln 99n` for 99 %).
pub fn rounds_to(n: f64, y: f64) -> f64 {
    (n * y / (1.0 - y)).ln()
}

/// The expected number of peers that deploy an undeployed machine in the same
/// round, given that at least one does, when `m` deployed peers each pick it
/// with probability `p`: `E(X') = m p / (1 - (1 - p)^m)`.
pub fn overhead(m: f64, p: f64) -> f64 {
    if m <= 0.0 || p <= 0.0 {
        return 1.0;
    }
    let miss = (1.0 - p).powf(m);
    if 1.0 - miss < 1e-12 {
        return 1.0;
    }
    m * p / (1.0 - miss)
}

/// The paper's `E(X') = (m/n) / (1 - (1 - 1/n)^m)`: every peer picks one of
/// the `n` machines uniformly.
pub fn overhead_paper(m: f64, n: f64) -> f64 {
    overhead(m, 1.0 / n)
}

/// The limit of `E(X')` as `m` reaches `n` and `n` grows: `1 / (1 - 1/e)`,
/// the paper's 1.582.
pub fn overhead_limit() -> f64 {
    1.0 / (1.0 - (-1.0f64).exp())
}

/// The probability that a peer receives no ping in a round when `senders`
/// peers each ping one of `choices` others uniformly: `(1 - 1/choices)^senders`
/// (the paper's Binomial(n, 1/n), about 1/e).
pub fn zero_pings(senders: f64, choices: f64) -> f64 {
    (1.0 - 1.0 / choices).powf(senders)
}
