//! What to do with an archive against the server's binlog list, decided without I/O:
//! which partial files are now complete, which are leftovers, which files were purged
//! before they were archived (a gap), and where streaming continues.

use std::collections::BTreeSet;

use super::binlog::{file_name, split_name};

/// A binlog file as `SHOW BINARY LOGS` lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerLog {
    pub name: String,
    pub size: u64,
}

/// A file the streamer wrote into the partial directory.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    pub name: String,
    pub size: u64,
    /// Only known (scanned) for files the server no longer lists: whether the file
    /// ends with the server's own ROTATE or STOP event.
    pub ends_cleanly: Option<bool>,
}

/// What the archive holds already.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Archived {
    /// Complete files with their sizes.
    pub files: Vec<(String, u64)>,
    /// Files recorded in a gap earlier.
    pub gaps: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Partial files now complete, with the size the server gives them (None: the
    /// server purged the file, which ends cleanly).
    pub finalize: Vec<(String, Option<u64>)>,
    /// Partial files of files archived already: to delete.
    pub stale: Vec<String>,
    /// Partial files of purged files that never got their end: kept beside the
    /// archive under another name, and part of the gap.
    pub lost: Vec<String>,
    /// Files that will never be archived: the server purged them first.
    pub gap: Vec<String>,
    /// The first file to stream.
    pub start: String,
    /// Partial files the streamer will write again from their start.
    pub rewrite: Vec<String>,
}

/// Decides; `Err` says how the server's binlog history contradicts the archive.
pub fn reconcile(
    archived: &Archived,
    server: &[ServerLog],
    partials: &[Partial],
) -> Result<Plan, String> {
    let number = |name: &str| -> Result<u64, String> {
        split_name(name)
            .map(|(_, n)| n)
            .ok_or_else(|| format!("{name:?} is not a binlog file name"))
    };
    let Some(newest) = server.last() else {
        return Err("the server lists no binlog file".into());
    };
    let (base, _) = split_name(&newest.name)
        .ok_or_else(|| format!("{:?} is not a binlog file name", newest.name))?;
    let size_on_server = |name: &str| server.iter().find(|s| s.name == name).map(|s| s.size);
    for (name, size) in &archived.files {
        if let Some(theirs) = size_on_server(name)
            && theirs != *size
        {
            return Err(format!(
                "the server's {name} has {theirs} bytes but the archived one has {size}: the server's binlogs are not the ones archived here (RESET MASTER, or a different server)"
            ));
        }
    }
    let complete: BTreeSet<u64> = archived
        .files
        .iter()
        .map(|(n, _)| number(n))
        .collect::<Result<_, _>>()?;
    let gapped: BTreeSet<u64> = archived
        .gaps
        .iter()
        .map(|n| number(n))
        .collect::<Result<_, _>>()?;
    let accounted_max = complete.iter().chain(&gapped).max().copied();
    let newest_n = number(&newest.name)?;
    if accounted_max.is_some_and(|m| newest_n <= m) {
        return Err(format!(
            "the server's newest binlog is {} but the archive already holds up to {}: the server's binlog numbering went back (RESET MASTER?)",
            newest.name,
            file_name(base, accounted_max.unwrap_or_default())
        ));
    }

    let mut plan = Plan::default();
    let mut partials: Vec<&Partial> = partials.iter().collect();
    partials.sort_by_key(|p| number(&p.name).unwrap_or(u64::MAX));
    let mut kept = Vec::new();
    for p in partials {
        let n = number(&p.name)?;
        if complete.contains(&n) || gapped.contains(&n) {
            plan.stale.push(p.name.clone());
            continue;
        }
        match size_on_server(&p.name) {
            Some(size) => {
                if n < newest_n && size == p.size {
                    plan.finalize.push((p.name.clone(), Some(size)));
                } else {
                    kept.push((n, p.name.clone()));
                }
            }
            None if p.ends_cleanly == Some(true) => plan.finalize.push((p.name.clone(), None)),
            None => plan.lost.push(p.name.clone()),
        }
    }

    let finalized: BTreeSet<u64> = plan
        .finalize
        .iter()
        .map(|(n, _)| number(n))
        .collect::<Result<_, _>>()?;
    let first_n = number(&server[0].name)?;
    // Where the archive's history must continue: after what it holds, or, for a new
    // archive, at the oldest file a streamer ever wrote (nothing before it was promised).
    let lost_min = plan.lost.iter().filter_map(|l| number(l).ok()).min();
    let lower = accounted_max.map(|m| m + 1).or(lost_min);
    if let Some(lower) = lower {
        plan.gap = (lower..first_n)
            .filter(|n| !finalized.contains(n) && !complete.contains(n))
            .map(|n| file_name(base, n))
            .collect();
    }

    let done_max = complete
        .iter()
        .chain(&finalized)
        .chain(&gapped)
        .max()
        .copied();
    let start = server
        .iter()
        .find(|s| {
            let n = number(&s.name).unwrap_or(0);
            done_max.is_none_or(|m| n > m)
        })
        .ok_or_else(|| {
            format!(
                "every file the server lists is archived already, the newest ({}) included",
                newest.name
            )
        })?;
    plan.start = start.name.clone();
    let start_n = number(&start.name)?;
    plan.rewrite = kept
        .into_iter()
        .filter(|(n, _)| *n >= start_n)
        .map(|(_, name)| name)
        .collect();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(list: &[(u64, u64)]) -> Vec<ServerLog> {
        list.iter()
            .map(|(n, size)| ServerLog {
                name: file_name("bin", *n),
                size: *size,
            })
            .collect()
    }

    fn partial(n: u64, size: u64, ends_cleanly: Option<bool>) -> Partial {
        Partial {
            name: file_name("bin", n),
            size,
            ends_cleanly,
        }
    }

    fn archived(files: &[(u64, u64)], gaps: &[u64]) -> Archived {
        Archived {
            files: files
                .iter()
                .map(|(n, s)| (file_name("bin", *n), *s))
                .collect(),
            gaps: gaps.iter().map(|n| file_name("bin", *n)).collect(),
        }
    }

    #[test]
    fn a_new_archive_starts_at_the_servers_oldest_file_without_a_gap() {
        let plan = reconcile(&Archived::default(), &logs(&[(3, 100), (4, 50)]), &[]).unwrap();
        assert_eq!(plan.start, "bin.000003");
        assert!(plan.gap.is_empty() && plan.finalize.is_empty());
    }

    #[test]
    fn resuming_finalizes_what_the_server_rotated_past_and_rewrites_the_rest() {
        let plan = reconcile(
            &archived(&[(1, 10), (2, 20)], &[]),
            &logs(&[(1, 10), (2, 20), (3, 30), (4, 40)]),
            &[partial(3, 30, None), partial(4, 12, None)],
        )
        .unwrap();
        assert_eq!(plan.finalize, vec![("bin.000003".to_string(), Some(30))]);
        assert_eq!(plan.start, "bin.000004");
        assert_eq!(plan.rewrite, vec!["bin.000004".to_string()]);
        // A short copy of a rotated file (its last events missed) is streamed again.
        let plan = reconcile(
            &archived(&[(1, 10)], &[]),
            &logs(&[(1, 10), (2, 20), (3, 30)]),
            &[partial(2, 17, None)],
        )
        .unwrap();
        assert!(plan.finalize.is_empty());
        assert_eq!((plan.start.as_str(), plan.rewrite.len()), ("bin.000002", 1));
    }

    #[test]
    fn files_purged_before_archiving_are_a_gap_once() {
        let before = archived(&[(1, 10), (2, 20)], &[]);
        let server = logs(&[(6, 60), (7, 70)]);
        // 3 was partly streamed, 4 ends cleanly (complete though purged), 5 never seen.
        let partials = [partial(3, 7, Some(false)), partial(4, 40, Some(true))];
        let plan = reconcile(&before, &server, &partials).unwrap();
        assert_eq!(plan.lost, vec!["bin.000003".to_string()]);
        assert_eq!(plan.finalize, vec![("bin.000004".to_string(), None)]);
        assert_eq!(
            plan.gap,
            vec!["bin.000003".to_string(), "bin.000005".into()]
        );
        assert_eq!(plan.start, "bin.000006");
        // Once recorded, the same gap is not reported again.
        let after = archived(&[(1, 10), (2, 20), (4, 40)], &[3, 5]);
        let plan = reconcile(&after, &server, &[]).unwrap();
        assert!(plan.gap.is_empty());
        assert_eq!(plan.start, "bin.000006");
    }

    #[test]
    fn leftovers_of_archived_files_are_stale() {
        let plan = reconcile(
            &archived(&[(1, 10)], &[]),
            &logs(&[(1, 10), (2, 5)]),
            &[partial(1, 10, None)],
        )
        .unwrap();
        assert_eq!(plan.stale, vec!["bin.000001".to_string()]);
        assert_eq!(plan.start, "bin.000002");
    }

    #[test]
    fn a_server_whose_history_differs_is_refused() {
        // The same name with another size.
        let err =
            reconcile(&archived(&[(1, 10)], &[]), &logs(&[(1, 11), (2, 5)]), &[]).unwrap_err();
        assert!(err.contains("bin.000001 has 11 bytes"), "{err}");
        // Numbering went back below what is archived.
        let err =
            reconcile(&archived(&[(1, 10), (2, 20)], &[]), &logs(&[(1, 10)]), &[]).unwrap_err();
        assert!(err.contains("went back"), "{err}");
    }
}
