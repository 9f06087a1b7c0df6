//! The compiled-chunk cache: an `eval` of a source the VM compiled before
//! behaves exactly as a fresh compile would (fresh locals, the right
//! environment, the same errors, still cancellable), whether the chunk is
//! cached, evicted, or the cache is off.

use crate::common;

use std::time::{Duration, Instant};

use common::{eventually, expect_msg, register_signal, within};
use mlua_isle::{Isle, IsleError, IslePool, LuaErrorKind};

const FRESH_LOCALS: &str = "local t = {} t.n = (t.n or 0) + 1 return t.n";

fn isle(entries: usize) -> Isle {
    Isle::builder()
        .chunk_cache(entries)
        .spawn(|_| Ok(()))
        .unwrap()
}

/// A one-VM pool, so that every session shares the same cache.
fn pool(entries: usize) -> IslePool {
    IslePool::builder()
        .workers(1)
        .chunk_cache(entries)
        .build()
        .unwrap()
}

#[test]
fn a_repeated_eval_gets_fresh_locals_every_time() {
    for entries in [64, 0] {
        let isle = isle(entries);
        for _ in 0..5 {
            assert_eq!(isle.eval::<i64>(FRESH_LOCALS).unwrap(), 1);
            assert_eq!(isle.eval::<i64>("1 + 1").unwrap(), 2);
            assert_eq!(isle.eval::<i64>("return 2 + 2").unwrap(), 4);
        }
        isle.shutdown().unwrap();
    }
}

#[test]
fn closures_made_by_a_repeated_eval_are_fresh_too() {
    let isle = isle(64);
    let src = "local n = 0 function bump() n = n + 1 return n end return bump()";
    assert_eq!(isle.eval::<i64>(src).unwrap(), 1);
    isle.eval::<()>("first = bump").unwrap();
    assert_eq!(isle.eval::<i64>(src).unwrap(), 1);
    assert_eq!(isle.call::<i64>("bump", ()).unwrap(), 2);
    // The closure of the first run kept its own `n`.
    assert_eq!(isle.call::<i64>("first", ()).unwrap(), 2);
    isle.shutdown().unwrap();
}

#[test]
fn a_repeated_eval_sees_and_sets_globals() {
    let isle = isle(64);
    let src = "count = (count or 0) + step return count";
    isle.eval::<()>("step = 1").unwrap();
    assert_eq!(isle.eval::<i64>(src).unwrap(), 1);
    assert_eq!(isle.eval::<i64>(src).unwrap(), 2);
    isle.exec(|lua| lua.globals().set("step", 10)).unwrap();
    assert_eq!(isle.eval::<i64>(src).unwrap(), 12);
    assert_eq!(isle.eval::<i64>("count").unwrap(), 12);
    isle.shutdown().unwrap();
}

#[test]
fn sessions_evaluating_the_same_source_keep_their_own_globals() {
    let pool = pool(64);
    // Counts in the table it runs in (sessions read through to the shared
    // globals, so `n or 0` would see the unkeyed count).
    let src = "n = (rawget(_G, 'n') or 0) + 1 return n";
    let (a, b) = (pool.session("a"), pool.session("b"));
    for i in 1..=3 {
        assert_eq!(a.eval::<i64>(src).unwrap(), i);
        assert_eq!(b.eval::<i64>(src).unwrap(), i);
    }
    assert_eq!(pool.eval::<i64>(src).unwrap(), 1); // the shared globals
    assert_eq!(a.eval::<i64>(src).unwrap(), 4);

    // Closed and reopened: a fresh environment, whatever was cached.
    assert!(pool.close_session("a"));
    let a = pool.session("a");
    assert_eq!(a.eval::<i64>(src).unwrap(), 1);
    assert_eq!(b.eval::<i64>(src).unwrap(), 4);
    assert_eq!(pool.eval::<i64>(src).unwrap(), 2);
    // Many sessions come and go on the same VM: none sees another's state.
    for k in 0..50 {
        let s = pool.session(format!("tmp-{k}"));
        assert_eq!(s.eval::<i64>(src).unwrap(), 1);
        assert_eq!(s.eval::<i64>(src).unwrap(), 2);
        assert!(s.close());
    }
    assert_eq!(a.eval::<i64>(src).unwrap(), 2);
    pool.shutdown().unwrap();
}

#[test]
fn an_expired_session_starts_fresh_with_the_same_source() {
    let pool = IslePool::builder()
        .workers(1)
        .session_idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let src = "n = (n or 0) + 1 return n";
    let s = pool.session("idle");
    assert_eq!(s.eval::<i64>(src).unwrap(), 1);
    assert_eq!(s.eval::<i64>(src).unwrap(), 2);
    eventually("the session expires", || {
        pool.metrics().sessions_expired == 1
    });
    assert_eq!(s.eval::<i64>(src).unwrap(), 1);
    pool.shutdown().unwrap();
}

#[test]
fn eviction_keeps_every_result_right() {
    let pool = pool(2);
    let sources: Vec<String> = (0..3)
        .map(|k| format!("local t = {{}} t.n = (t.n or 0) + {k} hits{k} = (rawget(_G, 'hits{k}') or 0) + 1 return t.n * 100 + hits{k}"))
        .collect();
    let s = pool.session("cycle");
    for round in 1..=10 {
        for (k, src) in sources.iter().enumerate() {
            assert_eq!(
                pool.eval::<i64>(src.as_str()).unwrap(),
                k as i64 * 100 + round
            );
            assert_eq!(s.eval::<i64>(src.as_str()).unwrap(), k as i64 * 100 + round);
        }
    }
    pool.shutdown().unwrap();
}

#[test]
fn recycled_vms_run_the_same_sources_afresh() {
    let pool = IslePool::builder()
        .workers(1)
        .recycle_after(3)
        .init(|lua| lua.globals().set("base", 40))
        .build()
        .unwrap();
    for _ in 0..10 {
        assert_eq!(pool.eval::<i64>("base + 2").unwrap(), 42);
        assert_eq!(pool.eval::<i64>(FRESH_LOCALS).unwrap(), 1);
    }
    assert!(pool.metrics().workers[0].recycled >= 3);
    pool.shutdown().unwrap();
}

#[test]
fn a_syntax_error_is_reported_the_same_every_time() {
    let isle = isle(64);
    let first = isle.eval::<()>("x = = 1").unwrap_err();
    let lua = first.as_lua().expect("a Lua error");
    assert_eq!(lua.kind(), LuaErrorKind::Syntax);
    assert!(lua.message().contains("eval:1:"), "{}", lua.message());
    for _ in 0..3 {
        assert_eq!(isle.eval::<()>("x = = 1").unwrap_err(), first);
    }
    isle.shutdown().unwrap();
}

#[test]
fn a_cached_chunk_reports_runtime_errors_at_the_same_line() {
    let isle = isle(64);
    let src = "local t = nil\nreturn t.x";
    let first = isle.eval::<()>(src).unwrap_err();
    let lua = first.as_lua().expect("a Lua error");
    assert_eq!(lua.kind(), LuaErrorKind::Runtime);
    assert!(lua.message().contains("eval:2:"), "{}", lua.message());
    assert_eq!(isle.eval::<()>(src).unwrap_err(), first);
    isle.shutdown().unwrap();
}

#[test]
fn a_chunk_that_assigns_env_runs_as_a_fresh_compile() {
    let isle = isle(64);
    let src = r#"
        if marker then return "stale" end
        _ENV = setmetatable({ marker = true }, { __index = _ENV })
        return "fresh"
    "#;
    for _ in 0..3 {
        assert_eq!(isle.eval::<String>(src).unwrap(), "fresh");
    }
    assert_eq!(isle.eval::<Option<bool>>("marker").unwrap(), None);
    isle.shutdown().unwrap();
}

#[test]
fn a_cached_chunk_is_still_cancelled_and_timed_out() {
    let (tx, started) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(move |lua| register_signal(lua, "started", tx)).unwrap();
    let spin = "started() while true do end";
    for _ in 0..3 {
        let task = isle.spawn_eval::<()>(spin);
        expect_msg(&started, "the loop started");
        task.cancel();
        assert_eq!(
            within("a cancelled loop", move || task.wait()),
            Err(IsleError::Cancelled)
        );
    }
    for _ in 0..3 {
        let submitted = Instant::now();
        let task = isle.spawn_eval::<()>(spin);
        expect_msg(&started, "the loop started");
        let task = task.timeout(submitted.elapsed() + Duration::from_millis(20));
        assert_eq!(
            within("a timed-out loop", move || task.wait()),
            Err(IsleError::Timeout)
        );
    }
    assert_eq!(isle.eval::<i64>(FRESH_LOCALS).unwrap(), 1);
    isle.shutdown().unwrap();
}

#[test]
fn a_cached_chunk_still_runs_in_the_sandbox() {
    let isle = Isle::builder().sandbox(true).spawn(|_| Ok(())).unwrap();
    let write = "string.upper = nil";
    let first = isle.eval::<()>(write).unwrap_err();
    assert_eq!(isle.eval::<()>(write).unwrap_err(), first);
    for _ in 0..2 {
        assert_eq!(isle.eval::<String>("string.upper('a')").unwrap(), "A");
        assert!(isle.eval::<()>("os.exit()").is_err());
    }
    isle.shutdown().unwrap();
}

#[test]
fn memory_errors_are_unchanged_and_cached_chunks_survive_them() {
    const MB: usize = 1 << 20;
    let isle = Isle::builder()
        .memory_limit(4 * MB)
        .spawn(|_| Ok(()))
        .unwrap();
    // Compiling this needs more than the limit.
    let huge = format!(
        "return {{ {} }}",
        (0..400_000)
            .map(|i| format!("'k{i}'"))
            .collect::<Vec<_>>()
            .join(",")
    );
    for _ in 0..2 {
        assert!(matches!(
            isle.eval::<()>(huge.as_str()),
            Err(IsleError::MemoryLimit(_))
        ));
        assert_eq!(isle.eval::<i64>(FRESH_LOCALS).unwrap(), 1);
        assert!(matches!(
            isle.eval::<()>("local s = string.rep('x', 8 * 1024 * 1024)"),
            Err(IsleError::MemoryLimit(_))
        ));
        assert_eq!(isle.eval::<i64>(FRESH_LOCALS).unwrap(), 1);
    }
    isle.shutdown().unwrap();
}
