//! The options of an image-taking session, defined once: the command line (clap), a
//! configuration file or the control protocol (serde) and the library all read this
//! struct, so they cannot disagree.

use capture::session::{CloneMode, CopierPriority, SessionOptions};
use clap::builder::TypedValueParser;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CopyOptions {
    /// Copier threads (2 was faster than 4 on a 2-core machine, and disturbs the
    /// database less).
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// How fast the copier goes: `auto` paces it by the database's own write and sync
    /// latency on the mount, within --latency-budget; a number limits it to that many
    /// MB/s; `off` lets it run as fast as the disks go (writes are always mirrored at
    /// full speed).
    #[arg(long, value_name = "auto|MB/s|off", default_value = "auto")]
    pub throttle: Throttle,
    /// With --throttle auto: the mean sync latency (ms) the database may see while the
    /// copier runs [default: twice what it saw on this mount outside backups, following
    /// the database when it stays slower than that with the copier nearly stopped].
    #[arg(long, value_name = "MS")]
    pub latency_budget: Option<f64>,
    /// Leave out entries matching this glob (relative to the mount root); repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// CPU and I/O priority of the copier: background (nice 10: the database's threads
    /// get the CPU first), idle (also the idle I/O class) or normal.
    #[arg(long, value_name = "PRIORITY", default_value = "background",
          value_parser = clap::builder::PossibleValuesParser::new(["background", "idle", "normal"])
              .map(|s: String| priority(&s)))]
    pub priority: CopierPriority,
    /// MB of image writes each copier thread keeps in flight before it waits for the
    /// disk (0: leave writeback to the kernel, which sends it in bursts the database's
    /// fsyncs queue behind).
    #[arg(long, value_name = "MB", default_value_t = 8)]
    pub writeback_window: u64,
    /// Clone file ranges (reflinks) instead of copying bytes: `auto` when the target is
    /// on the backing directory's XFS (reflink=1) or btrfs mount, `always` (refuse
    /// otherwise), `never`.
    #[arg(long, value_name = "WHEN", default_value = "auto",
          value_parser = clap::builder::PossibleValuesParser::new(["auto", "always", "never"])
              .map(|s: String| clone_mode(&s)))]
    pub clone: CloneMode,
}

fn priority(s: &str) -> CopierPriority {
    match s {
        "idle" => CopierPriority::Idle,
        "normal" => CopierPriority::Normal,
        _ => CopierPriority::Background,
    }
}

fn clone_mode(s: &str) -> CloneMode {
    match s {
        "always" => CloneMode::Always,
        "never" => CloneMode::Never,
        _ => CloneMode::Auto,
    }
}

/// `--throttle`: `auto`, a rate in MB/s, or `off`. Measured with `scripts/bench-backup`:
/// `auto` is the one setting that kept the database at 0.7x its TPS or better during
/// a backup, so it is the default; `off` is for a maintenance window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Throttle {
    Rate(f64),
    Mode(Pace),
}

/// The words (in a config file: `throttle = "auto"` or `"off"`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pace {
    Auto,
    Off,
}

impl Throttle {
    pub const AUTO: Throttle = Throttle::Mode(Pace::Auto);
    pub const OFF: Throttle = Throttle::Mode(Pace::Off);
}

impl std::str::FromStr for Throttle {
    type Err = String;
    fn from_str(s: &str) -> Result<Throttle, String> {
        match s {
            "auto" => Ok(Throttle::AUTO),
            "off" => Ok(Throttle::OFF),
            _ => s
                .parse()
                .map(Throttle::Rate)
                .map_err(|_| format!("{s:?} is neither `auto`, a number of MB/s nor `off`")),
        }
    }
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            parallel: 2,
            throttle: Throttle::AUTO,
            latency_budget: None,
            exclude: Vec::new(),
            priority: CopierPriority::Background,
            writeback_window: 8,
            clone: CloneMode::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionsError {
    #[error("--parallel must be at least 1")]
    Parallel,
    #[error("--throttle must be auto, a positive number of MB/s, or off")]
    Throttle,
    #[error("--latency-budget goes with --throttle auto (the default), not with a rate or off")]
    BudgetWithoutAuto,
    #[error("--latency-budget must be a positive number of milliseconds")]
    Budget,
    #[error("{0}")]
    Exclude(String),
}

impl CopyOptions {
    /// The capture session's options, after checking these.
    pub fn session(&self) -> Result<SessionOptions, OptionsError> {
        if self.parallel == 0 {
            return Err(OptionsError::Parallel);
        }
        let rate = match self.throttle {
            Throttle::Rate(t) if t.is_nan() || t <= 0.0 => {
                return Err(OptionsError::Throttle);
            }
            Throttle::Rate(t) => Some((t * 1_000_000.0) as u64),
            Throttle::Mode(_) => None,
        };
        let auto = self.throttle == Throttle::AUTO;
        let budget = match self.latency_budget {
            Some(_) if !auto => return Err(OptionsError::BudgetWithoutAuto),
            Some(ms) if ms.is_nan() || ms <= 0.0 => return Err(OptionsError::Budget),
            Some(ms) => Some((ms * 1000.0) as u64),
            None => None,
        };
        let options = SessionOptions {
            parallel: self.parallel,
            throttle_bytes_per_sec: rate,
            throttle_auto: auto,
            latency_budget_us: budget,
            exclude: self.exclude.clone(),
            priority: self.priority,
            writeback_window: self.writeback_window << 20,
            clone: self.clone,
            ..SessionOptions::default()
        };
        options
            .validate()
            .map_err(|e| OptionsError::Exclude(e.to_string()))?;
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        copy: CopyOptions,
    }

    #[test]
    fn flags_and_config_give_the_same_options() {
        let cli = Cli::parse_from([
            "x",
            "--parallel",
            "3",
            "--throttle",
            "50",
            "--exclude",
            "tmp/*",
            "--clone",
            "never",
        ]);
        let config: CopyOptions = serde_json::from_str(
            r#"{"parallel": 3, "throttle": 50.0, "exclude": ["tmp/*"], "clone": "never"}"#,
        )
        .unwrap();
        assert_eq!(cli.copy, config);
        let auto = Cli::parse_from(["x", "--throttle", "auto", "--latency-budget", "2.5"]);
        let auto_config: CopyOptions =
            serde_json::from_str(r#"{"throttle": "auto", "latency_budget": 2.5}"#).unwrap();
        assert_eq!(auto.copy, auto_config);
        let s = auto_config.session().unwrap();
        assert!(s.throttle_auto);
        assert_eq!(
            (s.latency_budget_us, s.throttle_bytes_per_sec),
            (Some(2500), None)
        );
        assert!(Cli::try_parse_from(["x", "--throttle", "fast"]).is_err());
        let off = Cli::parse_from(["x", "--throttle", "off"]);
        let off_config: CopyOptions = serde_json::from_str(r#"{"throttle": "off"}"#).unwrap();
        assert_eq!(off.copy, off_config);
        let s = off_config.session().unwrap();
        assert!(!s.throttle_auto && s.throttle_bytes_per_sec.is_none());
        assert!(
            CopyOptions::default().session().unwrap().throttle_auto,
            "auto is the default"
        );
        let idle = Cli::parse_from(["x", "--priority", "idle"]);
        let idle_config: CopyOptions = serde_json::from_str(r#"{"priority": "idle"}"#).unwrap();
        assert_eq!(idle.copy, idle_config);
        assert_eq!(
            idle_config.session().unwrap().priority,
            CopierPriority::Idle
        );
        assert!(Cli::try_parse_from(["x", "--priority", "low"]).is_err());
        let s = config.session().unwrap();
        assert_eq!(s.throttle_bytes_per_sec, Some(50_000_000));
        assert_eq!(s.parallel, 3);
        assert_eq!(s.clone, CloneMode::Never);
        // Defaults agree too.
        assert_eq!(Cli::parse_from(["x"]).copy, CopyOptions::default());
        assert_eq!(
            serde_json::from_str::<CopyOptions>("{}").unwrap(),
            CopyOptions::default()
        );
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let bad = |f: fn(&mut CopyOptions)| {
            let mut o = CopyOptions::default();
            f(&mut o);
            o.session().unwrap_err()
        };
        assert_eq!(bad(|o| o.parallel = 0), OptionsError::Parallel);
        assert_eq!(
            bad(|o| o.throttle = Throttle::Rate(0.0)),
            OptionsError::Throttle
        );
        assert_eq!(
            bad(|o| {
                o.throttle = Throttle::OFF;
                o.latency_budget = Some(3.0)
            }),
            OptionsError::BudgetWithoutAuto
        );
        assert_eq!(bad(|o| o.latency_budget = Some(-1.0)), OptionsError::Budget);
        assert!(matches!(
            bad(|o| o.exclude = vec!["a[".into()]),
            OptionsError::Exclude(_)
        ));
        assert!(serde_json::from_str::<CopyOptions>(r#"{"paralel": 2}"#).is_err());
        assert!(serde_json::from_str::<CopyOptions>(r#"{"clone": "sometimes"}"#).is_err());
        assert!(Cli::try_parse_from(["x", "--clone", "sometimes"]).is_err());
    }
}
