//! `hotbackup adopt` and `unadopt`: print the plan, or carry it out and say what is left;
//! `hotbackup systemd`: the units that run the agent (and the scheduled backup).

use agent::adopt::{self, AdoptOptions, UnadoptOptions};
use anyhow::Context;

pub fn adopt(options: &AdoptOptions) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("could not find the path of this binary")?;
    let plan = adopt::plan(options, &exe)?;
    print!("{plan}");
    if options.common.dry_run {
        println!("(dry run: nothing changed)");
        return Ok(());
    }
    let left = adopt::adopt(&plan)?;
    println!("adopted {}", plan.record.datadir.display());
    for command in left {
        println!("next: {command}");
    }
    println!(
        "then start the server (e.g. systemctl start {}): it finds its files through the mount",
        options.server_unit
    );
    Ok(())
}

pub fn unadopt(options: &UnadoptOptions) -> anyhow::Result<()> {
    let plan = adopt::unadopt_plan(options)?;
    print!("{plan}");
    if options.common.dry_run {
        println!("(dry run: nothing changed)");
        return Ok(());
    }
    adopt::unadopt(&plan)?;
    println!(
        "unadopted: {} is a plain directory again",
        plan.record.datadir.display()
    );
    Ok(())
}

/// `hotbackup systemd`: print the units, or write them under `root`.
pub fn systemd(
    print: bool,
    root: &std::path::Path,
    options: &agent::service::ServiceOptions,
) -> anyhow::Result<()> {
    use agent::service;
    let exe = std::env::current_exe().context("could not find the path of this binary")?;
    let files = service::units(options, &exe)?;
    if print {
        for f in &files {
            println!("### /{}\n{}", f.path.display(), f.text);
        }
        return Ok(());
    }
    let written = service::install(root, &files)
        .with_context(|| format!("could not write the units under {}", root.display()))?;
    for path in written {
        println!("wrote {}", path.display());
    }
    println!(
        "next: systemctl daemon-reload && systemctl enable --now {}",
        service::instance_unit(&options.mountpoint)?
    );
    if options.timer.is_some() {
        println!(
            "and: systemctl enable --now {} (its options: {})",
            service::BACKUP_TIMER,
            agent::config::DEFAULT_PATH
        );
    }
    Ok(())
}
