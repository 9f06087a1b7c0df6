//! Errors on a pool and on a session: panics resolve `Panic` and the VM
//! keeps serving; blocking calls from a pool's own VM threads are
//! `Reentrant`; Lua errors keep their position; missing functions are
//! `NotFound`.

mod common;

use common::within;
use mlua_isle::{mlua, IsleError, IslePool, Task};

fn pool() -> IslePool {
    IslePool::new(1, |lua| {
        let boom =
            lua.create_function(|_, ()| -> mlua::Result<()> { panic!("callback panicked") })?;
        lua.globals().set("boom", boom)?;
        lua.globals().set("not_a_function", 5)
    })
    .unwrap()
}

#[test]
fn a_panic_in_exec_is_a_panic_and_the_pool_serves_next() {
    let pool = pool();
    let r = pool.exec::<(), _>(|_| panic!("exec panicked"));
    assert!(
        matches!(&r, Err(IsleError::Panic(m)) if m.contains("exec panicked")),
        "{r:?}"
    );
    assert_eq!(pool.eval::<i64>("1 + 1"), Ok(2));
    let r = pool
        .spawn_exec::<(), _>(|_| panic!("{}", String::from("owned message")))
        .wait();
    assert!(
        matches!(&r, Err(IsleError::Panic(m)) if m.contains("owned message")),
        "{r:?}"
    );
    assert_eq!(pool.eval::<i64>("2 + 2"), Ok(4));
    pool.shutdown().unwrap();
}

#[test]
fn a_panic_in_a_session_exec_keeps_the_session() {
    let pool = pool();
    let s = pool.session("p");
    s.eval::<()>("kept = true").unwrap();
    let r = s.exec::<(), _>(|_, _| panic!("session exec panicked"));
    assert!(
        matches!(&r, Err(IsleError::Panic(m)) if m.contains("session exec panicked")),
        "{r:?}"
    );
    assert_eq!(s.eval::<bool>("kept"), Ok(true));
    pool.shutdown().unwrap();
}

#[test]
fn a_panicking_callback_is_a_panic_even_under_pcall() {
    let pool = pool();
    let s = pool.session("cb");
    for code in ["boom()", "pcall(boom)", "return select(2, pcall(boom))"] {
        let r = pool.eval::<()>(code);
        assert!(
            matches!(&r, Err(IsleError::Panic(m)) if m.contains("callback panicked")),
            "{code}: {r:?}"
        );
        let r = s.eval::<()>(code);
        assert!(
            matches!(&r, Err(IsleError::Panic(m)) if m.contains("callback panicked")),
            "{code}: {r:?}"
        );
    }
    assert_eq!(pool.eval::<i64>("1"), Ok(1));
    pool.shutdown().unwrap();
}

#[test]
fn blocking_calls_from_a_pool_thread_are_reentrant() {
    let pool = pool();
    let p = pool.clone();
    let results = within("reentrant calls return at once", move || {
        let inner = p.clone();
        p.exec(move |_| {
            Ok(vec![
                inner.eval::<i64>("1").map(|_| ()),
                inner.call::<()>("print", ()),
                inner.exec(|_| Ok(())),
                inner.session("s").eval::<()>(""),
                inner.session("s").exec(|_, _| Ok(())),
                inner.shutdown(),
                inner.shutdown_timeout(std::time::Duration::from_secs(1)),
            ])
        })
    })
    .unwrap();
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r, Err(IsleError::Reentrant), "call {i}");
    }
    assert_eq!(pool.eval::<i64>("1"), Ok(1), "the pool still serves");
    pool.shutdown().unwrap();
}

#[test]
fn blocking_calls_from_a_session_thread_are_reentrant() {
    let pool = pool();
    let inner = pool.clone();
    let r = within("reentrant call returns", move || {
        pool.session("outer")
            .exec(move |_, _| Ok(inner.session("other").eval::<i64>("1")))
    });
    assert_eq!(r, Ok(Err(IsleError::Reentrant)));
}

#[test]
fn waiting_on_a_task_from_a_pool_thread_is_reentrant() {
    // One worker: the spawned request cannot run while we wait for it.
    let pool = pool();
    let inner = pool.clone();
    let r = within("the wait returns at once", move || {
        pool.exec(move |_| {
            let task: Task<i64> = inner.spawn_eval("1");
            Ok(task.wait())
        })
    });
    assert_eq!(r, Ok(Err(IsleError::Reentrant)));
}

#[test]
fn spawning_from_a_pool_thread_is_fine() {
    let pool = pool();
    let inner = pool.clone();
    let task: Task<i64> = pool
        .exec(move |_| Ok(inner.session("later").spawn_eval("return 41 + 1")))
        .unwrap();
    assert_eq!(task.wait(), Ok(42));
    pool.shutdown().unwrap();
}

#[test]
fn blocking_on_another_pool_from_a_pool_thread_is_fine() {
    let a = pool();
    let b = pool();
    let b2 = b.clone();
    assert_eq!(a.exec(move |_| Ok(b2.eval::<i64>("6 * 7"))), Ok(Ok(42)));
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn lua_errors_keep_their_position_on_pool_and_session() {
    let pool = pool();
    let e = pool
        .eval::<()>("local x = 1\nerror('bad thing')")
        .unwrap_err();
    let lua = e.as_lua().expect("a Lua error");
    assert!(lua.message().starts_with("eval:2:"), "{}", lua.message());
    assert!(lua.message().contains("bad thing"));
    let e = pool
        .session(3)
        .eval::<()>("error('in session')")
        .unwrap_err();
    assert!(e.as_lua().unwrap().message().starts_with("eval:1:"), "{e}");
    let e = pool.eval::<()>("this is not lua").unwrap_err();
    assert_eq!(e.as_lua().unwrap().kind(), mlua_isle::LuaErrorKind::Syntax);
    pool.shutdown().unwrap();
}

#[test]
fn calling_a_missing_or_non_function_global_fails_clearly() {
    let pool = pool();
    let s = pool.session("s");
    assert_eq!(
        pool.call::<()>("missing", ()),
        Err(IsleError::NotFound("missing".into()))
    );
    assert_eq!(
        s.call::<()>("missing", ()),
        Err(IsleError::NotFound("missing".into()))
    );
    for r in [
        pool.call::<()>("not_a_function", ()),
        s.call::<()>("not_a_function", ()),
    ] {
        let e = r.unwrap_err();
        assert!(
            e.as_lua()
                .is_some_and(|l| l.message().contains("not_a_function")),
            "{e}"
        );
    }
    pool.shutdown().unwrap();
}

#[test]
fn non_blocking_calls_from_a_pool_thread_work() {
    let pool = IslePool::new(2, |_| Ok(())).unwrap();
    let s = pool.session("self");
    s.eval::<()>("x = 1").unwrap();
    pool.session("other").eval::<()>("y = 1").unwrap();
    let inner = pool.clone();
    let (workers, open, closed_other, closed_self) = within("non-blocking calls return", {
        let s = s.clone();
        move || {
            s.exec(move |_, env| {
                let m = inner.metrics();
                // Closing its own session takes effect after this request.
                let closed_self = inner.session("self").close();
                env.set("x", 2)?;
                Ok((
                    inner.workers(),
                    m.sessions_open,
                    inner.close_session("other"),
                    closed_self,
                ))
            })
        }
    })
    .unwrap();
    assert_eq!(
        (workers, open, closed_other, closed_self),
        (2, 2, true, true)
    );
    assert_eq!(
        s.eval::<Option<i64>>("x"),
        Ok(None),
        "the session was not closed"
    );
    pool.shutdown().unwrap();
}

struct PanicsOnDrop;

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        panic!("dropped a value that panics on drop");
    }
}

#[test]
fn a_result_that_panics_when_dropped_does_not_strand_later_requests() {
    let pool = IslePool::new(1, |_| Ok(())).unwrap();
    pool.spawn_exec(|_| Ok(PanicsOnDrop)).detach();
    let mut next = pool.session("after").spawn_eval::<i64>("return 1");
    let r = next
        .wait_timeout(common::PATIENCE)
        .expect("a request after the panicking drop never resolved");
    assert!(matches!(r, Ok(1) | Err(IsleError::Panic(_))), "{r:?}");
}
