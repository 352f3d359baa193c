//! oslo's queue manager (`use_queue_manager`): stable reply and fanout queue names
//! `<hostname>:<processname>:<n>` instead of random ones, so that a restarted service finds
//! its queues again instead of leaving orphans behind.
//!
//! The counter `n` lives in `/dev/shm/<hostname>_<processname>_qmanager` as
//! `<pgid>:<counter>:<start time>` (no newline), exactly as oslo.messaging 18.3.1 writes it:
//! each name taken by the same process group (same group id and the same start time of its
//! leader, field 22 of `/proc/<pgid>/stat`) increments it; a new process group (a restart)
//! starts again at 1; a missing or unreadable file counts as 0. oslo serializes the update
//! with a file lock under `[oslo_concurrency] lock_path`; warren serializes it within the
//! process and replaces the file atomically.

use std::fs;
use std::path::PathBuf;

use parking_lot::Mutex;

/// Serializes read-increment-write within this process.
static LOCK: Mutex<()> = Mutex::new(());

/// The next stable name part, `<hostname>:<processname>:<n>`.
pub(crate) fn next_name(hostname: &str, processname: &str) -> String {
    let counter = next_counter(&counter_file(hostname, processname), process_group());
    format!("{hostname}:{processname}:{counter}")
}

fn counter_file(hostname: &str, processname: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/{hostname}_{processname}_qmanager"))
}

/// This process's group id and its leader's start time (oslo's identity of a run).
fn process_group() -> (String, String) {
    let own = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let pgid = own
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2))
        .unwrap_or("0")
        .to_string();
    let leader = if pgid == "0" { "self" } else { pgid.as_str() };
    // oslo splits naively on whitespace and takes field 22.
    let start_time = fs::read_to_string(format!("/proc/{leader}/stat"))
        .ok()
        .and_then(|stat| stat.split_whitespace().nth(21).map(str::to_string))
        .unwrap_or_default();
    (pgid, start_time)
}

fn next_counter(file: &PathBuf, (pgid, start_time): (String, String)) -> u64 {
    let _guard = LOCK.lock();
    let previous = fs::read_to_string(file).ok().and_then(|text| {
        let parts: Vec<&str> = text.split(':').collect();
        match parts.as_slice() {
            [pg, counter, started] => Some((
                pg.to_string(),
                counter.parse::<u64>().ok()?,
                started.to_string(),
            )),
            _ => None,
        }
    });
    let counter = match previous {
        Some((pg, counter, started)) if pg == pgid && started == start_time => counter + 1,
        _ => 1,
    };
    let temporary = file.with_extension(format!("tmp{}", std::process::id()));
    let written = fs::write(&temporary, format!("{pgid}:{counter}:{start_time}"))
        .and_then(|()| fs::rename(&temporary, file));
    if let Err(e) = written {
        log::warn!(
            "queue manager: cannot record counter {counter} in {}: {e}",
            file.display()
        );
    }
    counter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_follows_oslos_rules() {
        let dir = std::env::temp_dir().join(format!("warren-qm-{}", crate::id::new_id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("h_p_qmanager");
        let run = || ("4242".to_string(), "99".to_string());
        assert_eq!(next_counter(&file, run()), 1, "no file: 1");
        assert_eq!(next_counter(&file, run()), 2);
        assert_eq!(next_counter(&file, run()), 3);
        assert_eq!(fs::read_to_string(&file).unwrap(), "4242:3:99");
        // A restart: another process group, or the same id with another start time.
        assert_eq!(next_counter(&file, ("4243".into(), "99".into())), 1);
        assert_eq!(next_counter(&file, ("4243".into(), "100".into())), 1);
        fs::write(&file, "garbage").unwrap();
        assert_eq!(next_counter(&file, run()), 1, "unreadable: starts again");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_are_host_process_counter() {
        let name = next_name("warren-test-host", &format!("p{}", crate::id::new_id()));
        let parts: Vec<&str> = name.split(':').collect();
        assert_eq!(parts[0], "warren-test-host");
        assert_eq!(parts[2], "1");
        let (pgid, start) = process_group();
        assert!(pgid.parse::<u64>().is_ok(), "{pgid}");
        // The group's leader may have exited (a shell that started the tests): then its start
        // time is unknown and the counter is keyed on the group id alone.
        if std::path::Path::new(&format!("/proc/{pgid}/stat")).exists() {
            assert!(start.parse::<u64>().is_ok(), "{start}");
        }
        let _ = fs::remove_file(counter_file(parts[0], parts[1]));
    }
}
