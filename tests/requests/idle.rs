//! An idle isle or pool uses no CPU: its threads park instead of spinning.
//!
//! Reads each thread's CPU time from `/proc` (Linux; clock ticks, usually
//! 10 ms) before and after a quiet period. A thread that kept spinning
//! would burn the whole period.

use std::fs;
use std::time::Duration;

use mlua_isle::{Isle, IslePool};

/// utime + stime, in clock ticks, of every thread whose name starts with
/// `prefix`.
fn cpu_ticks(prefix: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc/self/task").expect("Linux /proc") {
        let dir = entry.expect("task entry").path();
        let Ok(name) = fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let name = name.trim().to_string();
        if !name.starts_with(prefix) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        out.push((name, ticks));
    }
    out.sort();
    out
}

/// Asserts the threads named `prefix*` use (almost) no CPU over a quiet
/// 500 ms: at most 2 ticks each, where spinning would take ~50.
fn assert_idle(prefix: &str, threads: usize) {
    let before = cpu_ticks(prefix);
    assert_eq!(before.len(), threads, "threads named {prefix}*: {before:?}");
    // The point of this test is that time passes with nothing to do.
    std::thread::sleep(Duration::from_millis(500));
    let after = cpu_ticks(prefix);
    for ((name, t0), (_, t1)) in before.iter().zip(&after) {
        assert!(t1 - t0 <= 2, "{name} used {} ticks while idle", t1 - t0);
    }
}

#[test]
fn an_idle_isle_uses_no_cpu() {
    let isle = Isle::builder().name("idle-isle").spawn(|_| Ok(())).unwrap();
    // Some traffic first, so the VM thread has been busy and then idles.
    for i in 0..1000 {
        assert_eq!(isle.eval::<i64>(format!("{i} + 1")).unwrap(), i + 1);
    }
    assert_idle("idle-isle", 1);
    isle.shutdown().unwrap();
}

#[test]
fn an_idle_pool_uses_no_cpu() {
    let pool = IslePool::builder()
        .name("idle-pool")
        .workers(2)
        .session_idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..1000)
        .map(|i| pool.spawn_eval::<i64>(format!("{i} + 1")))
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.wait().unwrap(), i as i64 + 1);
    }
    pool.session("s").eval::<()>("x = 1").unwrap();
    assert_idle("idle-pool", 2);
    pool.shutdown().unwrap();
}
