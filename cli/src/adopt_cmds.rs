//! `hotbackup adopt` and `unadopt`: print the plan, or carry it out and say what is left.

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
