//! Building a pool: worker count, `init` on every VM, thread names, and the
//! construction guard (a failing or panicking `init` stops and joins the
//! workers already started, and the error names the worker).

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{thread_alive, thread_gone, within, worker_index};
use mlua_isle::{mlua, IsleError, IslePool};

#[test]
fn workers_default_to_the_number_of_cpus() {
    let pool = IslePool::builder().name("pbDef").build().unwrap();
    assert_eq!(pool.workers(), num_cpus::get());
    assert!(pool.workers() >= 1);
    assert_eq!(pool.metrics().workers.len(), pool.workers());
    pool.shutdown().unwrap();
}

#[test]
fn new_starts_the_given_number_of_workers() {
    let pool = IslePool::new(3, |_| Ok(())).unwrap();
    assert_eq!(pool.workers(), 3);
    assert_eq!(pool.metrics().workers.len(), 3);
    assert_eq!(pool.eval::<i64>("return 20 + 22"), Ok(42));
    pool.shutdown().unwrap();
}

#[test]
fn zero_workers_is_an_init_error() {
    let err = IslePool::builder().workers(0).build().unwrap_err();
    assert!(matches!(err, IsleError::Init(_)), "{err:?}");
    let err = IslePool::new(0, |_| Ok(())).unwrap_err();
    assert!(matches!(err, IsleError::Init(_)), "{err:?}");
}

#[test]
fn init_runs_once_on_every_vm() {
    let calls = Arc::new(AtomicUsize::new(0));
    let pool = {
        let calls = calls.clone();
        IslePool::builder()
            .workers(3)
            .init(move |lua| {
                calls.fetch_add(1, Ordering::SeqCst);
                lua.globals().set("from_init", "yes")?;
                lua.globals().set("init_runs", 1)
            })
            .build()
            .unwrap()
    };
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let seen = pool.broadcast(|lua| {
        let g = lua.globals();
        Ok((g.get::<String>("from_init")?, g.get::<i64>("init_runs")?))
    });
    assert_eq!(seen.len(), 3);
    for r in seen {
        assert_eq!(r, Ok(("yes".to_string(), 1)));
    }
    pool.shutdown().unwrap();
}

#[test]
fn worker_threads_are_named_after_the_pool() {
    let pool = IslePool::builder()
        .workers(2)
        .name("pbNm")
        .init(|lua| lua.globals().set("IDX", worker_index()))
        .build()
        .unwrap();
    assert!(thread_alive("pbNm-0"));
    assert!(thread_alive("pbNm-1"));
    assert!(!thread_alive("pbNm-2"));
    // Broadcast answers in worker order: worker k runs on thread NAME-k.
    let order: Vec<_> = pool
        .broadcast(|lua| lua.globals().get::<usize>("IDX"))
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(order, vec![0, 1]);
    pool.shutdown().unwrap();
    assert!(thread_gone("pbNm-0"));
    assert!(thread_gone("pbNm-1"));
}

#[test]
fn a_failing_init_names_the_worker_and_leaves_no_thread() {
    let calls = Arc::new(AtomicUsize::new(0));
    let failed_on = Arc::new(AtomicUsize::new(usize::MAX));
    let builder = {
        let (calls, failed_on) = (calls.clone(), failed_on.clone());
        IslePool::builder()
            .workers(4)
            .name("pbFail")
            .init(move |_| {
                if calls.fetch_add(1, Ordering::SeqCst) == 2 {
                    failed_on.store(worker_index(), Ordering::SeqCst);
                    return Err(mlua::Error::runtime("no config for this VM"));
                }
                Ok(())
            })
    };
    let err = within("build with a failing init returns", move || builder.build()).unwrap_err();
    let k = failed_on.load(Ordering::SeqCst);
    assert!(k < 4, "the third init never ran");
    let IsleError::Init(msg) = &err else {
        panic!("expected Init, got {err:?}")
    };
    assert!(msg.contains(&format!("worker {k}")), "{msg}");
    assert!(msg.contains("no config for this VM"), "{msg}");
    for w in 0..4 {
        assert!(
            thread_gone(&format!("pbFail-{w}")),
            "pbFail-{w} outlived build"
        );
    }
}

#[test]
fn a_panicking_init_is_a_panic_naming_the_worker_and_leaves_no_thread() {
    let calls = Arc::new(AtomicUsize::new(0));
    let failed_on = Arc::new(AtomicUsize::new(usize::MAX));
    let builder = {
        let (calls, failed_on) = (calls.clone(), failed_on.clone());
        IslePool::builder()
            .workers(3)
            .name("pbPanic")
            .init(move |_| {
                if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    failed_on.store(worker_index(), Ordering::SeqCst);
                    panic!("init exploded");
                }
                Ok(())
            })
    };
    let err = within("build with a panicking init returns", move || {
        builder.build()
    })
    .unwrap_err();
    let k = failed_on.load(Ordering::SeqCst);
    let IsleError::Panic(msg) = &err else {
        panic!("expected Panic, got {err:?}")
    };
    assert!(msg.contains(&format!("worker {k}")), "{msg}");
    assert!(msg.contains("init exploded"), "{msg}");
    for w in 0..3 {
        assert!(
            thread_gone(&format!("pbPanic-{w}")),
            "pbPanic-{w} outlived build"
        );
    }
}

#[test]
fn builder_options_are_accepted_and_the_pool_serves() {
    let pool = IslePool::builder()
        .workers(2)
        .name("pbOpt")
        .stack_size(4 << 20)
        .hook_interval(10)
        .default_timeout(Duration::from_secs(30))
        .queue_capacity(1000)
        .session_idle_timeout(Duration::from_secs(30))
        .init(|lua| {
            lua.load("function fib(n) if n < 2 then return n end return fib(n-1) + fib(n-2) end")
                .exec()
        })
        .build()
        .unwrap();
    assert_eq!(pool.call::<i64>("fib", 20), Ok(6765));
    assert_eq!(pool.session("s").call::<i64>("fib", 10), Ok(55));
    pool.shutdown().unwrap();
}

#[test]
fn a_pool_task_is_a_future() {
    let pool = IslePool::new(2, |_| Ok(())).unwrap();
    let sum = futures::executor::block_on(async {
        let a = pool.spawn_eval::<i64>("return 40");
        let b = pool.session(1u8).spawn_eval::<i64>("return 2");
        a.await.unwrap() + b.await.unwrap()
    });
    assert_eq!(sum, 42);
    pool.shutdown().unwrap();
}

#[test]
fn handles_are_clone_send_sync_and_debug() {
    fn check<T: Clone + Send + Sync + std::fmt::Debug + 'static>() {}
    check::<IslePool>();
    check::<mlua_isle::Session>();
    check::<mlua_isle::PoolMetrics>();
    check::<mlua_isle::SessionKey>();
    let pool = IslePool::new(1, |_| Ok(())).unwrap();
    let s = pool.session(42);
    assert!(format!("{pool:?}").contains("IslePool"));
    assert!(format!("{s:?}").contains("42"));
    assert!(format!("{:?}", IslePool::builder().workers(3)).contains('3'));
    pool.shutdown().unwrap();
}
