//! Replication between test servers on loopback: a source's replication user, a replica
//! started from a backup's coordinates, catching up, and table checksums to compare.

use std::collections::BTreeMap;
use std::time::Duration;

use super::mariadb::MariaDb;

pub const REPL_USER: &str = "hb_repl";
pub const REPL_PASSWORD: &str = "hb-repl-pw";

/// Lets replicas log in over TCP from 127.0.0.1. The anonymous users of
/// `mariadb-install-db` would shadow the new user for such logins: they go first.
pub fn add_replication_user(source: &MariaDb) {
    source.sql(&format!(
        "SET SESSION sql_log_bin = 0;\n\
         DELETE FROM mysql.global_priv WHERE User = '';\n\
         FLUSH PRIVILEGES;\n\
         CREATE USER IF NOT EXISTS '{REPL_USER}'@'127.0.0.1' IDENTIFIED BY '{REPL_PASSWORD}';\n\
         GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'127.0.0.1';"
    ));
}

/// Points `replica` at `source` from the GTID position `gtid` and starts it.
pub fn start_replica(replica: &MariaDb, source: &MariaDb, gtid: &str) {
    replica.sql(&format!(
        "SET GLOBAL gtid_slave_pos = '{gtid}';\n\
         CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={}, MASTER_USER='{REPL_USER}', \
         MASTER_PASSWORD='{REPL_PASSWORD}', MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1;\n\
         START SLAVE;",
        source.port()
    ));
}

/// Waits until `replica` has applied everything `source` has binlogged so far; panics
/// with the replica's status if it stops or does not get there in `timeout`.
pub fn wait_caught_up(replica: &MariaDb, source: &MariaDb, timeout: Duration) {
    let target = source.value("SELECT @@GLOBAL.gtid_binlog_pos");
    let waited = replica.value(&format!(
        "SELECT MASTER_GTID_WAIT('{target}', {})",
        timeout.as_secs()
    ));
    if waited != "0" {
        panic!(
            "the replica did not reach {target} in {timeout:?}:\n{}",
            replica.sql("SHOW SLAVE STATUS\\G")
        );
    }
}

/// `CHECKSUM TABLE ... EXTENDED` of every base table of `schemas`, by `schema.table`.
pub fn checksums(db: &MariaDb, schemas: &[&str]) -> BTreeMap<String, String> {
    let list = schemas
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(",");
    let tables: Vec<String> = db
        .rows(&format!(
            "SELECT CONCAT(table_schema, '.', table_name) FROM information_schema.tables \
             WHERE table_schema IN ({list}) AND table_type = 'BASE TABLE' ORDER BY 1"
        ))
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    if tables.is_empty() {
        return BTreeMap::new();
    }
    db.rows(&format!("CHECKSUM TABLE {} EXTENDED", tables.join(", ")))
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}
