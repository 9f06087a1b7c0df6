//! Cancellation, on every front end (an isle, a pool, a session): queued
//! requests never run; running Lua code is interrupted wherever it loops
//! (coroutines, pcall, xpcall handlers, library callbacks) and cannot
//! swallow the cancel; the VM, and a session's state, stay usable.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::front::{each_kind, fronts, Front, Fronts};
use common::{expect_msg, gate, register_signal, releasable_front, within, Gate, UNTIL_RELEASED};
use crossbeam_channel::Receiver;
use mlua_isle::mlua;
use mlua_isle::{current_token, IsleError, IslePool, Task};

/// Fronts whose VMs have `started()`, which reports on the returned channel
/// that a request is running.
fn fronts_with_started() -> (Fronts, Receiver<()>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let fronts = fronts().init(move |lua| register_signal(lua, "started", tx.clone()));
    (fronts, rx)
}

/// Holds `front`'s VM in a Rust closure until the gate is released.
fn block(front: &Front) -> (Gate, Task<()>) {
    let (gate, block) = gate();
    let blocker = front.spawn_exec(move |_| {
        block.block();
        Ok(())
    });
    gate.wait_started();
    (gate, blocker)
}

/// On every front: waits until `code` (which must call `started()`) runs,
/// cancels it, and checks that it resolves `Cancelled`, that the VM answers
/// afterwards with its state intact, and that code written to escape the
/// cancel (it sets `escaped` once out) did not get out.
fn cancel_while_running(code: &str) {
    let (fronts, started) = fronts_with_started();
    fronts.each(|front| {
        front.eval::<()>("kept = 'yes'").unwrap();
        let task = front.spawn_eval::<()>(code);
        expect_msg(&started, "the request started");
        task.cancel();
        assert_eq!(
            within("a cancelled request resolves", move || task.wait()),
            Err(IsleError::Cancelled),
            "{code} {front}"
        );
        // Requests run in order: once this answers, the cancelled one has
        // finished unwinding.
        assert_eq!(
            front.eval::<(bool, String)>("escaped == nil, kept"),
            Ok((true, "yes".to_string())),
            "after cancelling {code} {front}"
        );
    });
}

#[test]
fn a_queued_request_cancelled_never_runs() {
    fronts().each(|front| {
        front.eval::<()>("state = 'kept'").unwrap();
        let (gate, blocker) = block(&front);
        let queued = front.spawn_eval::<()>("state = 'clobbered'");
        let after = front.spawn_eval::<String>("state");
        queued.cancel();
        // Resolves while the VM is still held by the blocker.
        assert_eq!(
            within("a cancelled queued request resolves", move || queued.wait()),
            Err(IsleError::Cancelled),
            "{front}"
        );
        assert!(!blocker.is_finished());
        gate.release();
        assert_eq!(blocker.wait(), Ok(()));
        assert_eq!(after.wait(), Ok("kept".to_string()), "{front}");
    });
}

#[test]
fn a_queued_exec_closure_cancelled_never_runs() {
    fronts().each(|front| {
        let (gate, blocker) = block(&front);
        let ran = Arc::new(AtomicBool::new(false));
        let queued = {
            let ran = ran.clone();
            front.spawn_exec(move |_| {
                ran.store(true, Ordering::SeqCst);
                Ok(())
            })
        };
        queued.cancel_token().cancel();
        assert_eq!(
            within("a cancelled queued closure resolves", move || queued.wait()),
            Err(IsleError::Cancelled),
            "{front}"
        );
        gate.release();
        assert_eq!(blocker.wait(), Ok(()));
        assert_eq!(front.eval::<i64>("0"), Ok(0));
        assert!(
            !ran.load(Ordering::SeqCst),
            "a cancelled queued closure ran {front}"
        );
    });
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
fn xpcall_loops_are_cancelled() {
    cancel_while_running(
        "started()
         while true do xpcall(function() while true do end end, function(e) return e end) end",
    );
}

/// Catchers that fail again and again: a failed `pcall` only looks for a
/// stop while one may be raised (`alarm/protected`), so these loops spend
/// their time where the check is skipped. The stop must still land, by
/// the hook, whatever the raised value.
const FAILING_CATCHERS: &[&str] = &[
    "while true do pcall(error, 'x') end",
    "while true do pcall(error, {}) end",
    "while true do pcall(error) end",
    "while true do xpcall(error, function(e) return e end, 42) end",
    "while true do xpcall(error, function(e) return {e} end, 'x') end",
    "while true do xpcall(error, error, 'x') end",
    "local t = setmetatable({}, { __index = function() error({}) end }) \
     while true do pcall(function() return t.x end) end",
];

#[test]
fn loops_of_failing_catchers_are_cancelled() {
    for code in FAILING_CATCHERS {
        cancel_while_running(&format!("started(); {code}"));
    }
}

#[test]
fn loops_of_failing_catchers_meet_time_and_instruction_limits() {
    each_kind(|kind| {
        for (limit, expected) in [
            (Some(200_000), IsleError::InstructionLimit),
            (None, IsleError::Timeout),
        ] {
            if cfg!(feature = "luau") && limit.is_some() {
                continue; // Luau counts no instructions: no budget there
            }
            let mut builder = fronts();
            if let Some(n) = limit {
                builder = builder.max_instructions(n);
            }
            let front = builder.build(kind);
            for code in FAILING_CATCHERS {
                let task = front.spawn_eval::<()>(*code);
                let task = match limit {
                    Some(_) => task,
                    None => task.timeout(std::time::Duration::from_millis(30)),
                };
                assert_eq!(
                    within(code, move || task.wait()),
                    Err(expected.clone()),
                    "{code} {front}"
                );
                assert_eq!(front.eval::<i64>("1 + 1"), Ok(2), "after {code} {front}");
            }
        }
    });
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
    fronts().each(|front| {
        let mut task = front.spawn_eval::<i64>("40 + 2");
        // Requests run in order: once this returns, `task` has finished.
        assert_eq!(front.eval::<i64>("0"), Ok(0));
        assert!(task.is_finished());
        task.cancel();
        assert!(
            !task.cancel_token().is_cancelled(),
            "a finished request reports it was not cancelled {front}"
        );
        assert_eq!(task.try_result(), Some(Ok(42)), "{front}");
    });
}

#[test]
fn cancel_from_another_thread_with_a_cloned_token() {
    let (fronts, started) = fronts_with_started();
    fronts.each(|front| {
        let task = front.spawn_eval::<()>("started(); while true do end");
        let token = task.cancel_token().clone();
        assert!(!token.is_cancelled());
        let canceller = {
            let started = started.clone();
            std::thread::spawn(move || {
                expect_msg(&started, "the request started");
                token.cancel();
                token.is_cancelled()
            })
        };
        assert_eq!(
            within("wait for a cancel from elsewhere", move || task.wait()),
            Err(IsleError::Cancelled),
            "{front}"
        );
        assert!(canceller.join().unwrap());
        assert_eq!(front.eval::<i64>("1 + 1"), Ok(2));
    });
}

#[test]
fn the_next_request_works_after_each_of_many_cancels() {
    let (fronts, started) = fronts_with_started();
    fronts.each(|front| {
        for i in 0..20 {
            let task = front.spawn_eval::<()>(format!("n = {i}; started(); while true do end"));
            expect_msg(&started, "the request started");
            task.cancel();
            assert_eq!(task.wait(), Err(IsleError::Cancelled));
            assert_eq!(front.eval::<i64>("n"), Ok(i), "after cancel #{i} {front}");
        }
    });
}

#[test]
fn cancelled_state_does_not_leak_into_the_next_request() {
    let (fronts, started) = fronts_with_started();
    fronts.each(|front| {
        let task = front.spawn_eval::<()>("started(); while true do end");
        expect_msg(&started, "the request started");
        task.cancel();
        assert_eq!(task.wait(), Err(IsleError::Cancelled));
        // Long enough for many hook ticks: a stale cancel would stop it.
        let sum = front.eval::<i64>("local s = 0; for i = 1, 200000 do s = s + i end; return s");
        assert_eq!(sum, Ok(200000 * 200001 / 2), "{front}");
    });
}

#[test]
fn rust_callback_sees_its_token_and_returns_early() {
    let saw_cancel = Arc::new(AtomicUsize::new(0));
    let (started_tx, started) = crossbeam_channel::unbounded();
    let fronts = {
        let saw_cancel = saw_cancel.clone();
        fronts().init(move |lua| {
            let (saw_cancel, started_tx) = (saw_cancel.clone(), started_tx.clone());
            let f = lua.create_function(move |lua, ()| {
                let token = current_token(lua).expect("a callback runs inside a request");
                let _ = started_tx.send(());
                while !token.is_cancelled() {
                    std::thread::yield_now(); // stands for polling some I/O
                }
                saw_cancel.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(mlua::Error::runtime("gave up: cancelled"))
            })?;
            lua.globals().set("wait_for_cancel", f)
        })
    };
    let mut seen = 0;
    fronts.each(|front| {
        let spawners: [&dyn Fn() -> Task<()>; 2] =
            [&|| front.spawn_call("wait_for_cancel", ()), &|| {
                front.spawn_eval("wait_for_cancel(); escaped = true")
            }];
        for spawn in spawners {
            let task = spawn();
            expect_msg(&started, "the callback started");
            task.cancel();
            assert_eq!(
                within("a callback returns early", move || task.wait()),
                Err(IsleError::Cancelled),
                "{front}"
            );
            // The caller may be answered before the callback notices (a stop
            // resolves a running request after a short grace); requests run
            // in order, so once the next one answers, the callback has
            // returned.
            let f = front.clone();
            assert_eq!(
                within("the next request", move || f.eval::<bool>("escaped == nil")),
                Ok(true),
                "{front}"
            );
            seen += 1;
            assert_eq!(saw_cancel.load(Ordering::SeqCst), seen, "{front}");
        }
    });
}

#[test]
fn current_token_is_the_running_requests_token() {
    fronts().each(|front| {
        let (before, after) = front
            .exec(|lua| {
                let token = current_token(lua).expect("exec runs inside a request");
                let before = token.is_cancelled();
                token.cancel(); // the request cancels itself
                Ok((before, token.is_cancelled()))
            })
            .unwrap(); // the closure's Ok is kept: nothing interrupted it
        assert_eq!((before, after), (false, true), "{front}");
        assert_eq!(front.eval::<i64>("1"), Ok(1));
    });
}

#[test]
fn current_token_is_none_during_init() {
    let (tx, rx) = crossbeam_channel::unbounded();
    let fronts = fronts().init(move |lua| {
        let _ = tx.send(("init closure", current_token(lua).is_some()));
        let tx = tx.clone();
        let probe = lua.create_function(move |lua, ()| {
            let _ = tx.send(("callback during init", current_token(lua).is_some()));
            Ok(())
        })?;
        lua.globals().set("probe", probe)?;
        lua.load("probe()").exec()
    });
    fronts.each(|front| {
        let seen: Vec<_> = rx.try_iter().collect();
        assert_eq!(
            seen,
            vec![("init closure", false), ("callback during init", false)],
            "{front}"
        );
    });
}

#[test]
fn current_token_is_none_for_a_plain_lua() {
    let lua = mlua::Lua::new();
    assert!(current_token(&lua).is_none());
}

#[test]
fn cancelling_twice_is_harmless() {
    let (fronts, started) = fronts_with_started();
    fronts.each(|front| {
        let running = front.spawn_eval::<()>("started(); while true do end");
        let queued: Task<i64> = front.spawn_eval("2");
        queued.cancel();
        queued.cancel();
        queued.cancel_token().cancel();
        expect_msg(&started, "the request started");
        running.cancel();
        running.cancel_token().clone().cancel();
        running.cancel();
        assert!(running.cancel_token().is_cancelled());
        assert_eq!(running.wait(), Err(IsleError::Cancelled), "{front}");
        assert_eq!(queued.wait(), Err(IsleError::Cancelled), "{front}");

        let done = front.spawn_eval::<i64>("3");
        assert_eq!(front.eval::<i64>("0"), Ok(0));
        done.cancel();
        done.cancel();
        assert_eq!(done.wait(), Ok(3), "{front}");
    });
}

#[test]
fn cancel_stops_a_running_script_before_its_side_effects() {
    each_kind(|kind| {
        let (front, flag, started) = releasable_front(kind);
        let task = front.spawn_eval::<()>(UNTIL_RELEASED);
        expect_msg(&started, "the request started");
        task.cancel();
        flag.raise();
        assert_eq!(task.wait(), Err(IsleError::Cancelled), "{front}");
        assert_eq!(front.eval::<bool>("finished == nil"), Ok(true), "{front}");
    });
}

// ===== pool only =====

#[test]
fn cancelling_on_a_busy_pool_leaves_other_requests_alone() {
    let (tx, started) = crossbeam_channel::unbounded();
    let pool = IslePool::new(2, move |lua| register_signal(lua, "started", tx.clone())).unwrap();
    let a = pool.spawn_eval::<()>("started(); while true do end");
    let b =
        pool.spawn_eval::<()>("started(); local n = 0 for i = 1, 2e5 do n = n + i end return n");
    expect_msg(&started, "one started");
    expect_msg(&started, "the other started");
    a.cancel();
    assert_eq!(a.wait(), Err(IsleError::Cancelled));
    assert_eq!(b.wait(), Ok(()));
    pool.shutdown().unwrap();
}
