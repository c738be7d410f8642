//! `prune`: which images a retention policy keeps (pure, so it is tested without a
//! repository), and removing the others. The newest complete image is always kept, and
//! an incomplete one never goes: it may still be being written, and the operator is
//! told about it instead.

use serde::{Deserialize, Serialize};

use super::{Listed, RepoError, Repository};

#[derive(Clone, Copy, Debug, Default, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct Policy {
    /// Keep the N newest backups.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: usize,
    /// Keep the newest backup of each of the last N days that have one (UTC days).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: usize,
    /// Keep the newest backup of each of the last N weeks that have one (ISO weeks, UTC).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    pub name: String,
    pub validity_point: String,
    pub keep: bool,
    /// Why it is kept (`last`, `daily`, `weekly`, `newest`, `incomplete`), or empty.
    pub reasons: Vec<String>,
}

/// Decides for every listed image (oldest first, as `Repository::list` gives them).
pub fn decide(images: &[Listed], policy: &Policy) -> Vec<Decision> {
    let mut out: Vec<Decision> = images
        .iter()
        .map(|l| Decision {
            name: l.name.clone(),
            validity_point: l.validity_point.clone(),
            keep: false,
            reasons: Vec::new(),
        })
        .collect();
    let mut complete: Vec<usize> = (0..images.len()).filter(|&i| images[i].complete).collect();
    complete.sort_by(|&a, &b| images[b].validity_point.cmp(&images[a].validity_point));
    let mut keep = |i: usize, why: &str| {
        out[i].keep = true;
        out[i].reasons.push(why.to_string());
    };
    for (i, l) in images.iter().enumerate() {
        if !l.complete {
            keep(i, "incomplete");
        }
    }
    if let Some(&newest) = complete.first() {
        keep(newest, "newest");
    }
    for &i in complete.iter().take(policy.keep_last) {
        keep(i, "last");
    }
    let mut bucket_keep = |n: usize, why: &str, period: fn(&str) -> Option<i64>| {
        let mut seen = Vec::new();
        for &i in &complete {
            let Some(p) = period(&images[i].validity_point) else {
                continue;
            };
            if seen.len() == n {
                break;
            }
            if !seen.contains(&p) {
                seen.push(p);
                keep(i, why);
            }
        }
    };
    bucket_keep(policy.keep_daily, "daily", day);
    bucket_keep(policy.keep_weekly, "weekly", |t| {
        day(t).map(|d| (d + 3).div_euclid(7))
    });
    out
}

/// Days since 1970-01-01 of an RFC 3339 UTC time (`2026-11-22T…`).
fn day(t: &str) -> Option<i64> {
    let y: i64 = t.get(0..4)?.parse().ok()?;
    let m: i64 = t.get(5..7)?.parse().ok()?;
    let d: i64 = t.get(8..10)?.parse().ok()?;
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Applies the policy (unless `dry_run`); returns every decision.
pub fn prune(
    repo: &dyn Repository,
    policy: &Policy,
    dry_run: bool,
    mut deleted: impl FnMut(&Decision),
) -> Result<Vec<Decision>, RepoError> {
    if policy.keep_last + policy.keep_daily + policy.keep_weekly == 0 {
        return Err(RepoError::Refused(
            "prune needs a policy: give --keep-last, --keep-daily and/or --keep-weekly".into(),
        ));
    }
    let decisions = decide(&repo.list()?, policy);
    if !dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            repo.delete(&d.name)?;
            deleted(d);
        }
    }
    Ok(decisions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, at: &str, complete: bool) -> Listed {
        Listed {
            name: name.into(),
            complete,
            validity_point: at.into(),
            kind: "backup".into(),
            bytes: 0,
            stored_bytes: 0,
            reason: None,
        }
    }

    fn kept(images: &[Listed], policy: Policy) -> Vec<String> {
        decide(images, &policy)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.name)
            .collect()
    }

    #[test]
    fn days_count_from_the_epoch() {
        assert_eq!(day("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(day("2000-03-01T12:00:00Z"), Some(11_017));
        // 2026-11-23 is a Monday: the ISO week changes between the 22nd and the 23rd.
        let week = |t| day(t).map(|d| (d + 3).div_euclid(7));
        assert_ne!(week("2026-11-22T23:00:00Z"), week("2026-11-23T01:00:00Z"));
        assert_eq!(week("2026-11-23T01:00:00Z"), week("2026-11-29T23:00:00Z"));
    }

    #[test]
    fn policies_keep_the_newest_of_each_period_and_never_the_unfinished() {
        let images = [
            image("mon-a", "2026-11-16T01:00:00Z", true),
            image("mon-b", "2026-11-16T13:00:00Z", true),
            image("tue", "2026-11-17T01:00:00Z", true),
            image("sun", "2026-11-22T01:00:00Z", true),
            image("mon2", "2026-11-23T01:00:00Z", true),
            image("partial", "", false),
        ];
        let p = |l, d, w| Policy {
            keep_last: l,
            keep_daily: d,
            keep_weekly: w,
        };
        assert_eq!(kept(&images, p(1, 0, 0)), ["mon2", "partial"]);
        assert_eq!(kept(&images, p(0, 3, 0)), ["tue", "sun", "mon2", "partial"]);
        assert_eq!(
            kept(&images, p(0, 5, 0)),
            ["mon-b", "tue", "sun", "mon2", "partial"]
        );
        assert_eq!(kept(&images, p(0, 0, 2)), ["sun", "mon2", "partial"]);
        // The newest complete image stays even with a policy that keeps nothing.
        assert_eq!(kept(&images[..5], p(0, 0, 0)), ["mon2"]);
    }
}
