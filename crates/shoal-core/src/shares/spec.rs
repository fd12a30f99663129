//! A parallel job as an operator writes it (`shoal job run FILE.toml`),
//! what the manager shows of it, and the messages between an agent and the
//! banker. Checking a definition is pure, so it lives here.

use super::Mode;
use crate::duration::parse_positive_duration;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The built-in BSP benchmark as a job's program (`shoal bsp`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BspProgram {
    /// `chain` or `all-to-all`.
    #[serde(default = "chain")]
    pub pattern: String,
    /// Iterations.
    #[serde(default = "ten")]
    pub iterations: u64,
    /// Work of unit 1 per iteration, millions of multiply-adds.
    #[serde(default = "hundred")]
    pub work: f64,
    /// Unit i listens on its node's address at port + i.
    #[serde(default = "port")]
    pub port: u16,
}

fn chain() -> String {
    "chain".into()
}
fn ten() -> u64 {
    10
}
fn hundred() -> f64 {
    100.0
}
fn port() -> u16 {
    7700
}
fn bank() -> Mode {
    Mode::Bank
}
fn five_s() -> String {
    "5s".into()
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}

/// Any program as a job's unit: run by the process adaptor, one per unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandProgram {
    /// The program (a template: `{{ unit }}`, `{{ units }}`, `{{ app_dir }}`).
    pub command: String,
    /// Its arguments, shell-quoted (a template, as `command`).
    #[serde(default)]
    pub args: String,
}

/// A job definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Its name (it names the apps job-NAME-I on the nodes).
    pub name: String,
    /// Number of units N.
    pub units: usize,
    /// The job's maximum CPU W; each unit starts at W/N.
    pub max_cpu: f64,
    /// `distributed`, `bank` or `static`.
    #[serde(default = "bank")]
    pub mode: Mode,
    /// Reporting period T.
    #[serde(default = "five_s")]
    pub period: String,
    /// Bank period B (default T).
    #[serde(default)]
    pub bank_period: Option<String>,
    /// Most units of this job on one node.
    #[serde(default = "one")]
    pub per_node: usize,
    /// Move a unit off a full, fully used node when another has room
    /// (§5.2.2); `shoal job migrate` moves one by hand either way.
    #[serde(default = "yes")]
    pub migrate: bool,
    /// The built-in benchmark, or:
    #[serde(default)]
    pub bsp: Option<BspProgram>,
    /// a program of your own.
    #[serde(default)]
    pub command: Option<CommandProgram>,
}

/// A bad job definition: the field, the problem and the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct JobSpecError {
    /// The field.
    pub field: String,
    /// What is wrong, and the fix.
    pub problem: String,
}

fn bad(field: &str, problem: impl Into<String>) -> JobSpecError {
    JobSpecError {
        field: field.into(),
        problem: problem.into(),
    }
}

impl JobSpec {
    /// T.
    pub fn period(&self) -> Duration {
        parse_positive_duration(&self.period).unwrap_or(Duration::from_secs(5))
    }

    /// B.
    pub fn bank_period(&self) -> Duration {
        self.bank_period
            .as_deref()
            .and_then(|b| parse_positive_duration(b).ok())
            .unwrap_or(self.period())
    }

    /// Checks everything that can be checked without a node.
    pub fn validate(&self) -> Result<(), JobSpecError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 40
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !self.name.starts_with('-');
        if !name_ok {
            return Err(bad(
                "name",
                format!(
                    "{:?} is not a job name: use 1-40 lowercase letters, digits and '-'",
                    self.name
                ),
            ));
        }
        if self.units == 0 || self.units > 1024 {
            return Err(bad("units", "must be between 1 and 1024"));
        }
        if !(self.max_cpu.is_finite() && self.max_cpu > 0.0) {
            return Err(bad(
                "max_cpu",
                format!(
                    "must be a positive number of CPUs (got {}), e.g. max_cpu = 2.5",
                    self.max_cpu
                ),
            ));
        }
        if self.per_node == 0 {
            return Err(bad(
                "per_node",
                "must be at least 1 (units of this job on one node)",
            ));
        }
        parse_positive_duration(&self.period).map_err(|e| bad("period", e.to_string()))?;
        if let Some(b) = &self.bank_period {
            let b = parse_positive_duration(b).map_err(|e| bad("bank_period", e.to_string()))?;
            if b < self.period() {
                return Err(bad(
                    "bank_period",
                    "must be at least the period T (usually a multiple of it)",
                ));
            }
        }
        match (&self.bsp, &self.command) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "bsp",
                    "give either [bsp] (the built-in benchmark) or [command], not both",
                ));
            }
            (None, None) => {
                return Err(bad(
                    "(file)",
                    "give the program: a [bsp] table for the built-in benchmark or a [command] table with command = \"...\"",
                ));
            }
            (Some(b), None) => {
                if b.pattern != "chain" && b.pattern != "all-to-all" {
                    return Err(bad(
                        "bsp.pattern",
                        format!("{:?}: use chain or all-to-all", b.pattern),
                    ));
                }
                if !(b.work.is_finite() && b.work >= 0.0) {
                    return Err(bad("bsp.work", "must be millions of multiply-adds >= 0"));
                }
                if u32::from(b.port) + self.units as u32 > 65535 {
                    return Err(bad("bsp.port", "port + units must stay below 65536"));
                }
            }
            (None, Some(c)) => {
                if c.command.trim().is_empty() {
                    return Err(bad("command.command", "must name the program to run"));
                }
            }
        }
        Ok(())
    }
}

/// What an agent reports of one unit every period T.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitReportBody {
    /// The unit's index.
    pub unit: usize,
    /// The node it runs on.
    pub node: String,
    /// CPU used over the period, CPUs.
    pub used: f64,
    /// Units it waited on.
    #[serde(default)]
    pub upstream: Vec<usize>,
    /// The node's remaining share: C less every share on it.
    pub host_free: f64,
    /// The node's capacity C.
    pub capacity: f64,
    /// Iterations done, if the program reports them.
    #[serde(default)]
    pub iterations: Option<u64>,
    /// The program finished.
    #[serde(default)]
    pub finished: bool,
}

/// The banker's answer: the unit's share now, and when to report next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShareReply {
    /// Share to enforce, CPUs.
    pub share: f64,
    /// Report again after this many milliseconds.
    pub period_ms: u64,
}

/// One unit as `shoal job show` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitStatus {
    /// Index.
    pub unit: usize,
    /// Node.
    pub node: String,
    /// Share, CPUs.
    pub share: f64,
    /// Last measured use, CPUs.
    pub used: f64,
    /// Units it last waited on.
    pub upstream: Vec<usize>,
    /// Iterations done, if reported.
    pub iterations: Option<u64>,
    /// Finished.
    pub finished: bool,
}

/// A job as `shoal job list|show` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The definition.
    pub spec: JobSpec,
    /// The bank's balance, CPUs.
    pub bank: f64,
    /// Σ shares + bank + in flight (always max_cpu).
    pub accounted: f64,
    /// Every unit.
    pub units: Vec<UnitStatus>,
    /// Nodes that reported themselves full (bottlenecks), and what the
    /// migration rule would move there.
    pub bottlenecks: Vec<String>,
    /// The last units moved to other nodes, and why.
    #[serde(default)]
    pub migrations: Vec<String>,
    /// Every unit finished.
    pub finished: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            name: "chain".into(),
            units: 4,
            max_cpu: 0.8,
            mode: Mode::Bank,
            period: "5s".into(),
            bank_period: None,
            per_node: 1,
            migrate: true,
            bsp: Some(BspProgram {
                pattern: "chain".into(),
                iterations: 10,
                work: 100.0,
                port: 7700,
            }),
            command: None,
        }
    }

    #[test]
    fn a_good_spec_passes_and_bad_ones_name_the_field() {
        assert!(spec().validate().is_ok());
        let mut s = spec();
        s.max_cpu = 0.0;
        assert_eq!(s.validate().unwrap_err().field, "max_cpu");
        let mut s = spec();
        s.bsp = None;
        assert!(s.validate().unwrap_err().problem.contains("[command]"));
        let mut s = spec();
        s.period = "5 parsecs".into();
        assert_eq!(s.validate().unwrap_err().field, "period");
        let mut s = spec();
        s.bank_period = Some("1s".into());
        assert_eq!(s.validate().unwrap_err().field, "bank_period");
        let mut s = spec();
        s.name = "Chain!".into();
        assert_eq!(s.validate().unwrap_err().field, "name");
    }
}
