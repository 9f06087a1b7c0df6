//! Cancellation: queued requests never run; running Lua code is interrupted
//! wherever it loops (coroutines, pcall, xpcall handlers, library
//! callbacks) and cannot swallow the cancel; the VM stays usable.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{expect_msg, gate, register_signal, releasable_isle, within, UNTIL_RELEASED};
use crossbeam_channel::Receiver;
use mlua_isle::mlua;
use mlua_isle::{current_token, Isle, IsleError, Task};

/// An isle with `started()`, which reports on the returned channel that a
/// request is running.
fn isle_with_started() -> (Isle, Receiver<()>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let isle = Isle::spawn(move |lua| register_signal(lua, "started", tx)).unwrap();
    (isle, rx)
}

/// Waits until `code` (which must call `started()`) runs, cancels it, and
/// checks that it resolves `Cancelled` and that the VM answers afterwards.
fn cancel_while_running(code: &str) {
    let (isle, started) = isle_with_started();
    let task = isle.spawn_eval::<()>(code);
    expect_msg(&started, "the request started");
    task.cancel();
    assert_eq!(
        within("a cancelled request resolves", move || task.wait()),
        Err(IsleError::Cancelled),
        "{code}"
    );
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2), "after cancelling {code}");
    // Code written to escape the cancel sets `escaped` once it got out.
    assert_eq!(isle.eval::<bool>("escaped == nil"), Ok(true), "{code}");
}

#[test]
fn cancelled_while_queued_never_runs() {
    let (gate, block) = gate();
    let isle = Isle::spawn(move |lua| block.register(lua, "block")).unwrap();
    let long = isle.spawn_eval::<()>("block()");
    gate.wait_started();
    let queued = isle.spawn_eval::<()>("queued_ran = true");
    queued.cancel();
    // Resolves while the VM is still held by the long request.
    assert_eq!(
        within("a cancelled queued request resolves", move || queued.wait()),
        Err(IsleError::Cancelled)
    );
    assert!(!long.is_finished());
    gate.release();
    assert_eq!(long.wait(), Ok(()));
    assert_eq!(isle.eval::<bool>("queued_ran == nil"), Ok(true));
}

#[test]
fn cancelled_queued_exec_closure_never_runs() {
    let (gate, block) = gate();
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let long = isle.spawn_exec(move |_| {
        block.block();
        Ok(())
    });
    gate.wait_started();
    let ran = Arc::new(AtomicBool::new(false));
    let queued = {
        let ran = ran.clone();
        isle.spawn_exec(move |_| {
            ran.store(true, Ordering::SeqCst);
            Ok(())
        })
    };
    queued.cancel_token().cancel();
    assert_eq!(queued.wait(), Err(IsleError::Cancelled));
    gate.release();
    assert_eq!(long.wait(), Ok(()));
    assert_eq!(isle.eval::<i64>("0"), Ok(0));
    assert!(
        !ran.load(Ordering::SeqCst),
        "a cancelled queued closure ran"
    );
}

#[test]
fn infinite_loop_is_cancelled() {
    cancel_while_running("started(); while true do end");
}

#[test]
fn loop_inside_coroutine_wrap_is_cancelled() {
    cancel_while_running(
        "started(); coroutine.wrap(function() while true do end end)(); escaped = true",
    );
}

#[test]
fn loops_of_coroutine_resume_are_cancelled() {
    // `resume` catches errors of the coroutine it runs; the cancel must
    // still get out.
    cancel_while_running(
        "started()
         while true do
           local co = coroutine.create(function() while true do end end)
           coroutine.resume(co)
         end",
    );
}

#[test]
fn coroutine_resume_cannot_swallow_the_cancel() {
    // `resume` turns the interruption into `false, <panic>`; the few
    // instructions after it end the request before the next hook tick.
    cancel_while_running(
        "started()
         local ok = coroutine.resume(coroutine.create(function() while true do end end))
         escaped = true",
    );
}

#[test]
#[cfg(not(feature = "luau"))] // Luau has no `load` (nor reader functions)
fn load_reader_cannot_swallow_the_cancel() {
    // `load` runs its reader function protected and returns `nil, err`;
    // looping around it must not keep the request alive.
    cancel_while_running(
        "started()
         while true do load(function() while true do end end) end",
    );
}

// `<close>` and `coroutine.close` are Lua 5.4 on.
#[cfg(any(feature = "lua54", feature = "lua55"))]
#[test]
fn coroutine_close_cannot_swallow_the_cancel() {
    // A suspended coroutine's pending `__close` handler loops when closed;
    // `coroutine.close` returns `false, err` instead of raising.
    cancel_while_running(
        "started()
         local co = coroutine.create(function()
             local guard <close> = setmetatable({}, { __close = function() while true do end end })
             coroutine.yield()
         end)
         coroutine.resume(co)
         while true do coroutine.close(co) end",
    );
}

#[test]
fn pcall_loops_are_cancelled() {
    cancel_while_running("started(); while true do pcall(function() while true do end end) end");
}

#[test]
fn pcall_cannot_swallow_the_cancel() {
    cancel_while_running("started(); pcall(function() while true do end end); escaped = true");
}

#[test]
fn xpcall_cannot_swallow_the_cancel() {
    cancel_while_running(
        "started()
         xpcall(function() while true do end end, function(m) return m end)
         escaped = true",
    );
}

#[test]
fn looping_xpcall_message_handler_is_cancelled() {
    cancel_while_running(
        "xpcall(function() error('enter the handler') end,
                function(m) started(); while true do end end)
         escaped = true",
    );
}

#[test]
fn loop_in_a_string_gsub_callback_inside_pcall_is_cancelled() {
    cancel_while_running(
        "started()
         pcall(string.gsub, 'abc', '%w', function(c) while true do end end)
         escaped = true",
    );
}

#[test]
fn loop_in_a_table_sort_comparator_is_cancelled() {
    cancel_while_running(
        "started()
         pcall(table.sort, {3, 1, 2}, function(a, b) while true do end end)
         escaped = true",
    );
}

#[test]
fn cancel_after_completion_keeps_the_result() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let task = isle.spawn_eval::<i64>("40 + 2");
    // Requests run in order: once this returns, `task` has finished.
    assert_eq!(isle.eval::<i64>("0"), Ok(0));
    assert!(task.is_finished());
    task.cancel();
    assert!(
        !task.cancel_token().is_cancelled(),
        "a finished request reports it was not cancelled"
    );
    assert_eq!(task.wait(), Ok(42));
}

#[test]
fn cancel_from_another_thread_with_a_cloned_token() {
    let (isle, started) = isle_with_started();
    let task = isle.spawn_eval::<()>("started(); while true do end");
    let token = task.cancel_token().clone();
    assert!(!token.is_cancelled());
    let canceller = std::thread::spawn(move || {
        expect_msg(&started, "the request started");
        token.cancel();
        token.is_cancelled()
    });
    assert_eq!(
        within("wait for a cancel from elsewhere", move || task.wait()),
        Err(IsleError::Cancelled)
    );
    assert!(canceller.join().unwrap());
    assert_eq!(isle.eval::<i64>("1 + 1"), Ok(2));
}

#[test]
fn the_next_request_works_after_each_of_many_cancels() {
    let (isle, started) = isle_with_started();
    for i in 0..20 {
        let task = isle.spawn_eval::<()>(format!("n = {i}; started(); while true do end"));
        expect_msg(&started, "the request started");
        task.cancel();
        assert_eq!(task.wait(), Err(IsleError::Cancelled));
        assert_eq!(isle.eval::<i64>("n"), Ok(i), "after cancel #{i}");
    }
}

#[test]
fn cancelled_state_does_not_leak_into_the_next_request() {
    let (isle, started) = isle_with_started();
    let task = isle.spawn_eval::<()>("started(); while true do end");
    expect_msg(&started, "the request started");
    task.cancel();
    assert_eq!(task.wait(), Err(IsleError::Cancelled));
    // Long enough for many hook ticks: a stale cancel would stop it.
    let sum = isle.eval::<i64>("local s = 0; for i = 1, 200000 do s = s + i end; return s");
    assert_eq!(sum, Ok(200000 * 200001 / 2));
}

#[test]
fn rust_callback_sees_its_token_and_returns_early() {
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let (started_tx, started) = crossbeam_channel::unbounded();
    let isle = {
        let saw_cancel = saw_cancel.clone();
        Isle::spawn(move |lua| {
            let f = lua.create_function(move |lua, ()| {
                let token = current_token(lua).expect("a callback runs inside a request");
                let _ = started_tx.send(());
                while !token.is_cancelled() {
                    std::thread::yield_now(); // stands for polling some I/O
                }
                saw_cancel.store(true, Ordering::SeqCst);
                Err::<(), _>(mlua::Error::runtime("gave up: cancelled"))
            })?;
            lua.globals().set("wait_for_cancel", f)
        })
        .unwrap()
    };
    let task = isle.spawn_eval::<()>("wait_for_cancel(); escaped = true");
    expect_msg(&started, "the callback started");
    task.cancel();
    assert_eq!(
        within("a callback returns early", move || task.wait()),
        Err(IsleError::Cancelled)
    );
    // The caller may be answered before the callback notices (a stop resolves
    // a running request after a short grace); requests run in order, so once
    // the next one answers, the callback has returned.
    assert_eq!(isle.eval::<bool>("escaped == nil"), Ok(true));
    assert!(saw_cancel.load(Ordering::SeqCst));
}

#[test]
fn current_token_is_the_running_requests_token() {
    let isle = Isle::spawn(|_| Ok(())).unwrap();
    let (before, after) = isle
        .exec(|lua| {
            let token = current_token(lua).expect("exec runs inside a request");
            let before = token.is_cancelled();
            token.cancel(); // the request cancels itself
            Ok((before, token.is_cancelled()))
        })
        .unwrap(); // the closure's Ok is kept: nothing interrupted it
    assert_eq!((before, after), (false, true));
    assert_eq!(isle.eval::<i64>("1"), Ok(1));
}

#[test]
fn current_token_is_none_during_init() {
    let (tx, rx) = crossbeam_channel::unbounded();
    let _isle = Isle::spawn(move |lua| {
        let _ = tx.send(("init closure", current_token(lua).is_some()));
        let tx = tx.clone();
        let probe = lua.create_function(move |lua, ()| {
            let _ = tx.send(("callback during init", current_token(lua).is_some()));
            Ok(())
        })?;
        lua.globals().set("probe", probe)?;
        lua.load("probe()").exec()
    })
    .unwrap();
    let seen: Vec<_> = rx.try_iter().collect();
    assert_eq!(
        seen,
        vec![("init closure", false), ("callback during init", false)]
    );
}

#[test]
fn current_token_is_none_for_a_plain_lua() {
    let lua = mlua::Lua::new();
    assert!(current_token(&lua).is_none());
}

#[test]
fn cancelling_twice_is_harmless() {
    let (isle, started) = isle_with_started();
    let running = isle.spawn_eval::<()>("started(); while true do end");
    let queued: Task<i64> = isle.spawn_eval("2");
    queued.cancel();
    queued.cancel();
    queued.cancel_token().cancel();
    expect_msg(&started, "the request started");
    running.cancel();
    running.cancel_token().clone().cancel();
    running.cancel();
    assert!(running.cancel_token().is_cancelled());
    assert_eq!(running.wait(), Err(IsleError::Cancelled));
    assert_eq!(queued.wait(), Err(IsleError::Cancelled));

    let done = isle.spawn_eval::<i64>("3");
    assert_eq!(isle.eval::<i64>("0"), Ok(0));
    done.cancel();
    done.cancel();
    assert_eq!(done.wait(), Ok(3));
}

#[test]
fn cancel_stops_a_running_script_before_its_side_effects() {
    let (isle, flag, started) = releasable_isle();
    let task = isle.spawn_eval::<()>(UNTIL_RELEASED);
    expect_msg(&started, "the request started");
    task.cancel();
    flag.raise();
    assert_eq!(task.wait(), Err(IsleError::Cancelled));
    assert_eq!(isle.eval::<bool>("finished == nil"), Ok(true));
}
