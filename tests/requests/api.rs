//! Loose ends of the public API: options that cannot be honoured, what
//! `is_cancellation` recognises, and the pool's counterparts of `Isle`'s
//! methods.

#[cfg_attr(feature = "luau", allow(unused_imports))] // used by one test, not on Luau
use crate::common;

use mlua_isle::{Isle, IsleError, IslePool};

/// Builds something with one option set.
type Build<T> = fn() -> Result<T, IsleError>;

fn init_error(r: Result<impl std::fmt::Debug, IsleError>) -> String {
    match r {
        Err(IsleError::Init(m)) => m,
        other => panic!("expected IsleError::Init, got {other:?}"),
    }
}

#[test]
fn a_zero_where_a_count_is_needed_is_refused_by_name() {
    let isle_options: [(&str, Build<Isle>); 3] = [
        ("hook_interval", || Isle::builder().hook_interval(0).build()),
        ("max_instructions", || {
            Isle::builder().max_instructions(0).build()
        }),
        ("memory_limit", || Isle::builder().memory_limit(0).build()),
    ];
    for (name, build) in isle_options {
        let m = init_error(build());
        assert!(m.contains(&format!("`{name}(0)`")), "{name}: {m}");
    }
    let pool_options: [(&str, Build<IslePool>); 5] = [
        ("workers", || IslePool::builder().workers(0).build()),
        ("recycle_after", || {
            IslePool::builder().workers(1).recycle_after(0).build()
        }),
        ("recycle_when_memory_above", || {
            IslePool::builder()
                .workers(1)
                .recycle_when_memory_above(0)
                .build()
        }),
        ("hook_interval", || {
            IslePool::builder().workers(1).hook_interval(0).build()
        }),
        ("memory_limit", || {
            IslePool::builder().workers(1).memory_limit(0).build()
        }),
    ];
    for (name, build) in pool_options {
        let m = init_error(build());
        assert!(m.contains(&format!("`{name}(0)`")), "{name}: {m}");
    }
    // One is the smallest value taken, and it works (Luau counts no
    // instructions: no budget there).
    let builder = Isle::builder().hook_interval(1);
    #[cfg(not(feature = "luau"))]
    let builder = builder.max_instructions(1_000_000);
    let isle = builder.build().unwrap();
    assert_eq!(
        isle.eval::<i64>("local s = 0 for i = 1, 10 do s = s + i end return s"),
        Ok(55)
    );
}

#[test]
fn is_cancellation_recognises_every_stop_and_nothing_else() {
    for e in [
        IsleError::Cancelled,
        IsleError::Timeout,
        IsleError::Shutdown,
        IsleError::InstructionLimit,
    ] {
        assert!(e.is_cancellation(), "{e:?}");
    }
    for e in [
        IsleError::QueueFull,
        IsleError::Reentrant,
        IsleError::SessionLost,
        IsleError::Panic("boom".into()),
        IsleError::Init("no".into()),
    ] {
        assert!(!e.is_cancellation(), "{e:?}");
    }
}

#[cfg(not(feature = "luau"))] // no instruction budget on Luau
#[test]
fn a_request_out_of_budget_reports_its_token_cancelled() {
    // The budget stops the request as a cancel would: its token says so,
    // and its error is a cancellation.
    let isle = Isle::builder().max_instructions(10_000).build().unwrap();
    let mut task = isle.spawn_eval::<()>("pcall(function() while true do end end)");
    let token = task.cancel_token().clone();
    let r = task
        .wait_timeout(common::PATIENCE)
        .expect("the budget stops it");
    assert_eq!(r, Err(IsleError::InstructionLimit));
    assert!(r.unwrap_err().is_cancellation());
    assert!(token.is_cancelled());
    // The budget is per request: the next one starts afresh.
    let next = isle.spawn_eval::<i64>("1 + 1");
    assert!(!next.cancel_token().is_cancelled());
    assert_eq!(next.wait(), Ok(2));
}

#[test]
fn a_pool_says_when_it_is_shut_down() {
    let pool = IslePool::new(1, |_| Ok(())).unwrap();
    assert!(!pool.is_shutdown());
    let other = pool.clone();
    pool.shutdown().unwrap();
    assert!(pool.is_shutdown() && other.is_shutdown());
    assert_eq!(other.eval::<i64>("1"), Err(IsleError::Shutdown));
}

#[test]
fn map_takes_the_function_name_as_call_does() {
    let pool = IslePool::new(2, |lua| lua.load("function sq(x) return x * x end").exec()).unwrap();
    let name = String::from("sq");
    assert_eq!(
        pool.map::<i64, i64>(name.clone(), [2, 3]),
        vec![Ok(4), Ok(9)]
    );
    assert_eq!(pool.map::<i64, i64>("sq", [4]), vec![Ok(16)]);
    assert_eq!(pool.call::<i64>(name, 5), Ok(25));
}

/// The Lua `task` library needs the `async` feature: asked for without
/// it, the build says so instead of starting VMs without it.
#[cfg(not(feature = "async"))]
#[test]
fn task_library_without_the_async_feature_is_an_init_error() {
    let e = mlua_isle::Isle::builder()
        .task_library(true)
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, mlua_isle::IsleError::Init(m) if m.contains("async")),
        "{e:?}"
    );
    let e = mlua_isle::IslePool::builder()
        .workers(1)
        .task_library(true)
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, mlua_isle::IsleError::Init(m) if m.contains("async")),
        "{e:?}"
    );
}
