//! Where a command points (a directory or `s3://bucket/prefix`) and how a bucket is
//! reached: endpoint, region and credentials come from flags, the standard AWS
//! environment variables or the usual credential files, never from argv.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::RepoError;

/// The options of every command that reads or writes a repository.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepoOptions {
    /// The S3-compatible server (default: $AWS_ENDPOINT_URL, else AWS itself).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Encrypt uploaded files (and decrypt them again) with the 32-byte key in this file
    /// (mode 0600 or stricter; make one with `head -c 32 /dev/urandom > FILE`).
    #[arg(long, value_name = "FILE")]
    pub encrypt_key_file: Option<PathBuf>,
    /// zstd level of uploaded files (1 fast .. 19 small).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compress_level: i32,
    /// Limit the transfer to this many bytes per second (suffixes K, M, G).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub limit_rate: Option<u64>,
    /// Objects transferred at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub transfers: usize,
    /// How often a failed S3 request is retried (with backoff) before giving up.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub s3_retries: usize,
    /// A local directory for an image on its way to or from a bucket (a backup is
    /// written here and then uploaded; a restore downloads here, by default next to
    /// --datadir).
    #[arg(long, value_name = "DIR")]
    pub staging_dir: Option<PathBuf>,
}

/// `50M` → 50 MiB/s.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("{s:?}: use a number of bytes with K, M or G")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    match num.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n * mult),
        _ => Err(format!(
            "{s:?} is not a rate; write bytes per second like 20M"
        )),
    }
}

/// A bucket and a key prefix (no leading or trailing slash; may be empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub prefix: String,
}

impl S3Url {
    /// The URL of a child (`s3://bucket/prefix/name`).
    pub fn child(&self, name: &str) -> S3Url {
        S3Url {
            bucket: self.bucket.clone(),
            prefix: join(&self.prefix, name),
        }
    }

    /// The last part of the prefix (an image's name) and the URL it lives in.
    pub fn split_name(&self) -> Option<(S3Url, String)> {
        let (parent, name) = match self.prefix.rsplit_once('/') {
            Some((p, n)) => (p.to_string(), n),
            None => (String::new(), self.prefix.as_str()),
        };
        (!name.is_empty()).then(|| {
            (
                S3Url {
                    bucket: self.bucket.clone(),
                    prefix: parent,
                },
                name.to_string(),
            )
        })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    S3(S3Url),
}

impl Location {
    /// `s3://bucket[/prefix]` or a path.
    pub fn parse(arg: &Path) -> Result<Location, RepoError> {
        let Some(rest) = arg.to_str().and_then(|s| s.strip_prefix("s3://")) else {
            return Ok(Location::Dir(arg.to_path_buf()));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid_bucket {
            return Err(RepoError::Refused(format!(
                "{}: {bucket:?} is not a bucket name (3 to 63 lower-case letters, digits, '-' or '.'); write s3://BUCKET/PREFIX",
                arg.display()
            )));
        }
        if prefix
            .split('/')
            .any(|p| p.is_empty() && !prefix.is_empty() || p == "." || p == "..")
        {
            return Err(RepoError::Refused(format!(
                "{}: the prefix has an empty, '.' or '..' part; write s3://BUCKET/PREFIX/NAME",
                arg.display()
            )));
        }
        Ok(Location::S3(S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        }))
    }

    pub fn is_s3(arg: &Path) -> bool {
        arg.to_str().is_some_and(|s| s.starts_with("s3://"))
    }
}

/// How to reach the bucket, resolved from flags, environment and files.
#[derive(Clone)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    pub retries: usize,
}

impl S3Config {
    pub fn resolve(options: &RepoOptions) -> Result<S3Config, RepoError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = env("HOME").map(PathBuf::from).unwrap_or_default();
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let credentials_file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/credentials"));
        let config_file = env("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".aws/config"));
        let from_file = |file: &Path, section: &str, key: &str| {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|t| ini_value(&t, section, key))
        };
        let config_section = if profile == "default" {
            "default".to_string()
        } else {
            format!("profile {profile}")
        };
        let (access_key_id, secret_access_key, session_token) = match (
            env("AWS_ACCESS_KEY_ID"),
            env("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Some(id), Some(secret)) => (id, secret, env("AWS_SESSION_TOKEN")),
            _ => match (
                from_file(&credentials_file, &profile, "aws_access_key_id"),
                from_file(&credentials_file, &profile, "aws_secret_access_key"),
            ) {
                (Some(id), Some(secret)) => (
                    id,
                    secret,
                    from_file(&credentials_file, &profile, "aws_session_token"),
                ),
                _ => {
                    return Err(RepoError::Refused(format!(
                        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or put them in profile [{profile}] of {}",
                        credentials_file.display()
                    )));
                }
            },
        };
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| from_file(&config_file, &config_section, "region"))
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = options
            .s3_endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"));
        Ok(S3Config {
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            session_token,
            retries: options.s3_retries,
        })
    }
}

/// `key = value` of `[section]` in an AWS-style INI file.
fn ini_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = s.trim().to_string();
        } else if current == section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            return Some(v.trim().to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_and_paths_are_told_apart() {
        assert_eq!(
            Location::parse(Path::new("s3://my-bucket/a/b/")).unwrap(),
            Location::S3(S3Url {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            })
        );
        assert_eq!(
            Location::parse(Path::new("/var/backups")).unwrap(),
            Location::Dir("/var/backups".into())
        );
        assert!(Location::parse(Path::new("s3://UPPER/x")).is_err());
        assert!(Location::parse(Path::new("s3://bucket/a/../b")).is_err());
        let url = S3Url {
            bucket: "b".repeat(3),
            prefix: "p/name".into(),
        };
        let (parent, name) = url.split_name().unwrap();
        assert_eq!((parent.prefix.as_str(), name.as_str()), ("p", "name"));
    }

    #[test]
    fn rates_take_suffixes() {
        assert_eq!(parse_rate("20M"), Ok(20 << 20));
        assert_eq!(parse_rate("512"), Ok(512));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn credential_files_are_read_by_profile() {
        let text = "[default]\naws_access_key_id = A\n[other]\naws_access_key_id=B\n";
        assert_eq!(
            ini_value(text, "other", "aws_access_key_id").as_deref(),
            Some("B")
        );
        assert_eq!(
            ini_value(text, "default", "aws_access_key_id").as_deref(),
            Some("A")
        );
        assert_eq!(ini_value(text, "none", "aws_access_key_id"), None);
    }
}
