//! The options of an image-taking session, defined once: the command line (clap), a
//! configuration file or the control protocol (serde) and the library all read this
//! struct, so they cannot disagree.

use capture::session::{CloneMode, SessionOptions};
use clap::builder::TypedValueParser;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CopyOptions {
    /// Copier threads (2 was faster than 4 on a 2-core machine, and disturbs the
    /// database less).
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Limit the copier to this many MB/s (writes are always mirrored at full speed).
    #[arg(long, value_name = "MB/s")]
    pub throttle: Option<f64>,
    /// Leave out entries matching this glob (relative to the mount root); repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Clone file ranges (reflinks) instead of copying bytes: `auto` when the target is
    /// on the backing directory's XFS (reflink=1) or btrfs mount, `always` (refuse
    /// otherwise), `never`.
    #[arg(long, value_name = "WHEN", default_value = "auto",
          value_parser = clap::builder::PossibleValuesParser::new(["auto", "always", "never"])
              .map(|s: String| clone_mode(&s)))]
    pub clone: CloneMode,
}

fn clone_mode(s: &str) -> CloneMode {
    match s {
        "always" => CloneMode::Always,
        "never" => CloneMode::Never,
        _ => CloneMode::Auto,
    }
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            parallel: 2,
            throttle: None,
            exclude: Vec::new(),
            clone: CloneMode::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionsError {
    #[error("--parallel must be at least 1")]
    Parallel,
    #[error("--throttle must be a positive number of MB/s")]
    Throttle,
    #[error("{0}")]
    Exclude(String),
}

impl CopyOptions {
    /// The capture session's options, after checking these.
    pub fn session(&self) -> Result<SessionOptions, OptionsError> {
        if self.parallel == 0 {
            return Err(OptionsError::Parallel);
        }
        if self.throttle.is_some_and(|t| t.is_nan() || t <= 0.0) {
            return Err(OptionsError::Throttle);
        }
        let options = SessionOptions {
            parallel: self.parallel,
            throttle_bytes_per_sec: self.throttle.map(|t| (t * 1_000_000.0) as u64),
            exclude: self.exclude.clone(),
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
        assert_eq!(bad(|o| o.throttle = Some(0.0)), OptionsError::Throttle);
        assert!(matches!(
            bad(|o| o.exclude = vec!["a[".into()]),
            OptionsError::Exclude(_)
        ));
        assert!(serde_json::from_str::<CopyOptions>(r#"{"paralel": 2}"#).is_err());
        assert!(serde_json::from_str::<CopyOptions>(r#"{"clone": "sometimes"}"#).is_err());
        assert!(Cli::try_parse_from(["x", "--clone", "sometimes"]).is_err());
    }
}
