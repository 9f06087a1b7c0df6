//! Sessions: every request of a key runs on the key's VM, in submission
//! order, in the session's own global environment (reads fall back to the
//! globals `init` set up); closing or idling a session drops its state.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, gate, worker_index, PATIENCE};
use mlua_isle::{IsleError, IslePool, SessionKey, Task};

/// A pool whose VMs know their index (`VM_ID`) and share a few globals from
/// `init`.
fn pool(workers: usize) -> IslePool {
    IslePool::new(workers, |lua| {
        lua.globals().set("VM_ID", worker_index())?;
        lua.load(
            r#"
            greeting = "hello from init"
            function shout(s) return string.upper(s) end
            function whoami() return "init" end
            "#,
        )
        .exec()
    })
    .unwrap()
}

#[test]
fn a_thousand_keys_count_to_twenty_in_submission_order_from_four_threads() {
    const KEYS_PER_THREAD: usize = 250;
    const ROUNDS: i64 = 20;
    let pool = pool(2);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let sessions: Vec<_> = (0..KEYS_PER_THREAD)
                    .map(|k| pool.session(format!("key-{}", t * KEYS_PER_THREAD + k)))
                    .collect();
                let mut tasks: Vec<(usize, i64, Task<i64>)> = Vec::new();
                for seq in 0..ROUNDS {
                    for (k, s) in sessions.iter().enumerate() {
                        let code = format!(
                            "n = (n or 0) + 1; log = (log or '') .. ',' .. {seq}; return n"
                        );
                        tasks.push((k, seq, s.spawn_eval::<i64>(code)));
                    }
                }
                for (k, seq, task) in tasks {
                    assert_eq!(task.wait(), Ok(seq + 1), "key {k}, request {seq}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let expected_log: String = (0..ROUNDS).map(|i| format!(",{i}")).collect();
    for key in 0..4 * KEYS_PER_THREAD {
        let s = pool.session(format!("key-{key}"));
        assert_eq!(
            s.eval::<(i64, String)>("return n, log"),
            Ok((ROUNDS, expected_log.clone())),
            "key-{key}"
        );
    }
    // Unkeyed work never saw any of it.
    assert_eq!(pool.eval::<Option<i64>>("return n"), Ok(None));
    let m = pool.metrics();
    assert_eq!(m.sessions_open, 1000);
    assert_eq!(m.workers.iter().map(|w| w.sessions).sum::<usize>(), 1000);
    pool.shutdown().unwrap();
}

#[test]
fn a_session_never_sees_another_sessions_globals() {
    let pool = pool(2);
    let (a, b) = (pool.session("a"), pool.session("b"));
    a.eval::<()>("secret = 'a'; only_a = true").unwrap();
    b.eval::<()>("secret = 'b'").unwrap();
    assert_eq!(a.eval::<String>("secret"), Ok("a".into()));
    assert_eq!(b.eval::<String>("secret"), Ok("b".into()));
    assert_eq!(b.eval::<Option<bool>>("only_a"), Ok(None));
    // Also when both live on the same VM.
    let pool1 = pool_one();
    let (c, d) = (pool1.session("c"), pool1.session("d"));
    c.eval::<()>("secret = 'c'").unwrap();
    assert_eq!(d.eval::<Option<String>>("secret"), Ok(None));
    d.eval::<()>("secret = 'd'").unwrap();
    assert_eq!(c.eval::<String>("secret"), Ok("c".into()));
    pool.shutdown().unwrap();
    pool1.shutdown().unwrap();
}

fn pool_one() -> IslePool {
    pool(1)
}

#[test]
fn unkeyed_work_and_other_sessions_do_not_see_session_globals() {
    let pool = pool(2);
    let s = pool.session("writer");
    s.eval::<()>("greeting = 'overwritten'; fresh = 1").unwrap();
    assert_eq!(s.eval::<String>("greeting"), Ok("overwritten".into()));
    for r in pool.broadcast(|lua| {
        let g = lua.globals();
        Ok((g.get::<String>("greeting")?, g.get::<Option<i64>>("fresh")?))
    }) {
        assert_eq!(r, Ok(("hello from init".to_string(), None)));
    }
    assert_eq!(
        pool.session("reader").eval::<String>("greeting"),
        Ok("hello from init".into())
    );
    pool.shutdown().unwrap();
}

#[test]
fn unkeyed_globals_are_not_session_globals() {
    let pool = pool(1);
    let s = pool.session("s");
    s.eval::<()>("mine = 'session'").unwrap();
    pool.eval::<()>("mine = 'unkeyed'").unwrap();
    assert_eq!(s.eval::<String>("mine"), Ok("session".into()));
    assert_eq!(pool.eval::<String>("mine"), Ok("unkeyed".into()));
    pool.shutdown().unwrap();
}

#[test]
fn session_reads_fall_back_to_init_globals() {
    let pool = pool(2);
    let s = pool.session(7u32);
    assert_eq!(s.eval::<String>("greeting"), Ok("hello from init".into()));
    assert_eq!(
        s.eval::<String>("shout(greeting)"),
        Ok("HELLO FROM INIT".into())
    );
    assert_eq!(s.eval::<String>("string.rep('ab', 2)"), Ok("abab".into()));
    pool.shutdown().unwrap();
}

#[test]
fn session_call_finds_its_own_functions_before_init_ones() {
    let pool = pool(2);
    let s = pool.session("caller");
    assert_eq!(s.call::<String>("shout", "hi"), Ok("HI".into()));
    assert_eq!(s.call::<String>("whoami", ()), Ok("init".into()));
    s.eval::<()>("function whoami() return 'session' end; function add(a, b) return a + b end")
        .unwrap();
    assert_eq!(s.call::<String>("whoami", ()), Ok("session".into()));
    assert_eq!(s.call::<i64>("add", (40, 2)), Ok(42));
    assert_eq!(s.spawn_call::<i64>("add", (1, 2)).wait(), Ok(3));
    // Another session and unkeyed work still see only init's.
    assert_eq!(
        pool.session("other").call::<String>("whoami", ()),
        Ok("init".into())
    );
    assert_eq!(pool.call::<String>("whoami", ()), Ok("init".into()));
    assert!(matches!(
        pool.session("other").call::<i64>("add", (1, 2)),
        Err(IsleError::NotFound(name)) if name == "add"
    ));
    pool.shutdown().unwrap();
}

#[test]
fn session_exec_gets_the_sessions_environment_table() {
    let pool = pool(2);
    let s = pool.session("env");
    s.eval::<()>("from_eval = 1").unwrap();
    let (seen, raw_init) = s
        .exec(|_, env| {
            env.set("from_exec", "written through env")?;
            Ok((
                env.get::<i64>("from_eval")?,
                env.raw_get::<Option<String>>("greeting")?,
            ))
        })
        .unwrap();
    assert_eq!(seen, 1);
    assert_eq!(
        raw_init, None,
        "env is the session's table, not the globals"
    );
    assert_eq!(
        s.eval::<String>("from_exec"),
        Ok("written through env".into())
    );
    assert_eq!(pool.eval::<Option<String>>("from_exec"), Ok(None));
    let task = s.spawn_exec(|_, env| env.get::<String>("greeting"));
    assert_eq!(task.wait(), Ok("hello from init".into()));
    pool.shutdown().unwrap();
}

#[test]
fn close_session_drops_state_and_says_whether_it_was_open() {
    let pool = pool(2);
    assert!(!pool.close_session("never-used"));
    let s = pool.session("tenant");
    s.eval::<()>("count = 41").unwrap();
    assert_eq!(pool.metrics().sessions_open, 1);
    assert!(pool.close_session("tenant"));
    assert!(!pool.close_session("tenant"));
    assert_eq!(pool.metrics().sessions_open, 0);
    assert_eq!(s.eval::<Option<i64>>("count"), Ok(None));
    assert_eq!(pool.metrics().sessions_open, 1);
    s.eval::<()>("count = 1").unwrap();
    assert!(s.close());
    assert!(!s.close());
    assert_eq!(s.eval::<Option<i64>>("count"), Ok(None));
    pool.shutdown().unwrap();
}

#[test]
fn closing_a_session_lets_its_queued_requests_finish_first() {
    let pool = pool(2);
    let s = pool.session("closing");
    s.eval::<()>("x = 10").unwrap();
    let (g, gf) = gate();
    let blocker = s.spawn_exec(move |_, _| {
        gf.block();
        Ok(())
    });
    g.wait_started();
    let queued: Vec<Task<i64>> = (0..3)
        .map(|_| s.spawn_eval("x = x + 1; return x"))
        .collect();
    assert!(s.close());
    g.release();
    blocker.wait().unwrap();
    let got: Vec<_> = queued.into_iter().map(Task::wait).collect();
    assert_eq!(got, vec![Ok(11), Ok(12), Ok(13)]);
    assert_eq!(s.eval::<Option<i64>>("x"), Ok(None), "state survived close");
    pool.shutdown().unwrap();
}

#[test]
fn integer_keys_of_any_width_name_the_same_session() {
    let pool = pool(2);
    pool.session(5u8).eval::<()>("v = 'five'").unwrap();
    for s in [
        pool.session(5i8),
        pool.session(5u16),
        pool.session(5i32),
        pool.session(5u64),
        pool.session(5i128),
        pool.session(5usize),
        pool.session(5isize),
        pool.session(5u128),
    ] {
        assert_eq!(s.eval::<String>("v"), Ok("five".into()), "{:?}", s.key());
        assert_eq!(s.key(), &SessionKey::from(5i64));
    }
    // The string "5" is another key.
    assert_eq!(pool.session("5").eval::<Option<String>>("v"), Ok(None));
    assert_eq!(pool.metrics().sessions_open, 2);
    assert!(pool.close_session(5u32));
    assert!(!pool.close_session(5i16));
    assert!(pool.close_session(String::from("5")));
    pool.shutdown().unwrap();
}

#[test]
fn string_keys_of_any_form_name_the_same_session() {
    let pool = pool(1);
    pool.session("tenant").eval::<()>("v = 1").unwrap();
    let owned = String::from("tenant");
    assert_eq!(pool.session(&owned).eval::<i64>("v"), Ok(1));
    assert_eq!(pool.session(owned).eval::<i64>("v"), Ok(1));
    let key: Arc<str> = Arc::from("tenant");
    assert_eq!(pool.session(key).eval::<i64>("v"), Ok(1));
    assert_eq!(pool.session("tenant").key().to_string(), "tenant");
    pool.shutdown().unwrap();
}

#[test]
fn session_handles_are_shared_across_clones_and_threads() {
    let pool = pool(2);
    let s = pool.session("shared");
    s.eval::<()>("hits = 0").unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    s.eval::<()>("hits = hits + 1").unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(pool.session("shared").eval::<i64>("hits"), Ok(200));
    pool.shutdown().unwrap();
}

#[test]
fn every_request_of_a_key_runs_on_the_same_vm() {
    let pool = pool(2);
    // Unkeyed load keeps both VMs busy meanwhile.
    let load: Vec<Task<i64>> = (0..400)
        .map(|i| {
            pool.spawn_eval(format!(
                "local s = 0 for j = 1, 200 do s = s + j end return {i}"
            ))
        })
        .collect();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let sessions: Vec<_> = (0..4).map(|k| pool.session(t * 4 + k)).collect();
                let tasks: Vec<(usize, Task<usize>)> = (0..25)
                    .flat_map(|_| {
                        sessions
                            .iter()
                            .enumerate()
                            .map(|(k, s)| (k, s.spawn_eval::<usize>("return VM_ID")))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let mut home: HashMap<usize, usize> = HashMap::new();
                for (k, task) in tasks {
                    let vm = task.wait().unwrap();
                    assert_eq!(*home.entry(k).or_insert(vm), vm, "key {} moved", t * 4 + k);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (i, t) in load.into_iter().enumerate() {
        assert_eq!(t.wait(), Ok(i as i64));
    }
    pool.shutdown().unwrap();
}

#[test]
fn new_keys_bind_to_the_least_loaded_vm() {
    let pool = pool(2);
    let mut per_vm: BTreeMap<usize, usize> = BTreeMap::new();
    for key in 0..20 {
        // A worker marks itself idle just after its request resolved, and
        // running work counts as load: bind once the last one has.
        eventually("the workers are idle", || {
            pool.metrics().workers.iter().all(|w| w.running == 0)
        });
        let vm: usize = pool.session(key).eval("return VM_ID").unwrap();
        *per_vm.entry(vm).or_default() += 1;
    }
    assert_eq!(per_vm.len(), 2, "every key went to one VM: {per_vm:?}");
    // Each bound session counts as load: the split is even.
    assert_eq!(per_vm.get(&0), Some(&10), "{per_vm:?}");
    let m = pool.metrics();
    assert_eq!(m.sessions_open, 20);
    for (w, metrics) in m.workers.iter().enumerate() {
        assert_eq!(metrics.sessions, per_vm[&w], "worker {w}");
    }
    pool.shutdown().unwrap();
}

#[test]
fn a_key_does_not_bind_to_a_vm_busy_with_a_long_request() {
    let pool = pool(2);
    let (g, gf) = gate();
    let blocker = pool.spawn_exec(move |_| {
        gf.block();
        Ok(worker_index())
    });
    g.wait_started();
    let vm: usize = pool.session("new").eval("return VM_ID").unwrap();
    g.release();
    let busy = blocker.wait().unwrap();
    assert_ne!(vm, busy);
    pool.shutdown().unwrap();
}

#[test]
fn an_idle_session_expires_and_its_state_is_gone() {
    let pool = IslePool::builder()
        .workers(2)
        .session_idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let s = pool.session("idle");
    s.eval::<()>("state = 'kept'").unwrap();
    assert_eq!(pool.metrics().sessions_open, 1);
    eventually("the idle session expires", || {
        pool.metrics().sessions_expired == 1
    });
    let m = pool.metrics();
    assert_eq!(m.sessions_open, 0);
    assert_eq!(m.workers.iter().map(|w| w.sessions).sum::<usize>(), 0);
    assert!(!pool.close_session("idle"), "an expired session is closed");
    assert_eq!(s.eval::<Option<String>>("state"), Ok(None));
    assert_eq!(pool.metrics().sessions_open, 1);
    pool.shutdown().unwrap();
}

#[test]
fn a_busy_session_does_not_expire() {
    let idle_timeout = Duration::from_secs(1);
    let pool = IslePool::builder()
        .workers(2)
        .session_idle_timeout(idle_timeout)
        .build()
        .unwrap();
    let busy = pool.session("busy");
    let idle = pool.session("idle");
    idle.eval::<()>("x = 1").unwrap();
    let start = Instant::now();
    let mut requests = 0i64;
    // Keep `busy` in use well past the idle timeout, until `idle` (which
    // shows that expiry runs meanwhile) has expired.
    while pool.metrics().sessions_expired == 0 || start.elapsed() < 3 * idle_timeout {
        assert!(start.elapsed() < PATIENCE, "the idle session never expired");
        requests += 1;
        assert_eq!(busy.eval::<i64>("n = (n or 0) + 1; return n"), Ok(requests));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pool.metrics().sessions_expired, 1);
    assert_eq!(busy.eval::<i64>("n"), Ok(requests));
    assert_eq!(idle.eval::<Option<i64>>("x"), Ok(None));
    pool.shutdown().unwrap();
}

/// Sessions are stamped idle when their last request ends, not when a
/// request is submitted: what keeps a session with a request waiting in its
/// VM's queue (here, past the idle timeout, behind another session's
/// blocked request) from expiring is the count of its pending requests.
#[test]
fn a_session_with_a_request_queued_past_the_idle_timeout_does_not_expire() {
    let idle_timeout = Duration::from_millis(20);
    let pool = IslePool::builder()
        .workers(1)
        .session_idle_timeout(idle_timeout)
        .build()
        .unwrap();
    let blocker = pool.session("blocker");
    let waiting = pool.session("waiting");
    waiting.eval::<()>("x = 1").unwrap();
    let (gate, block) = gate();
    let held = blocker.spawn_exec(move |_, _| {
        block.block();
        Ok(())
    });
    gate.wait_started();
    let queued = waiting.spawn_eval::<Option<i64>>("return x");
    // Time passing is the point: the queued request's session has been idle
    // (no request running) for several timeouts when the VM gets to it, and
    // the VM sweeps for idle sessions between requests.
    std::thread::sleep(5 * idle_timeout);
    gate.release();
    held.wait().unwrap();
    assert_eq!(queued.wait(), Ok(Some(1)));
    pool.shutdown().unwrap();
}

#[test]
fn sessions_without_an_idle_timeout_stay_open() {
    let pool = pool(2);
    let s = pool.session("forever");
    s.eval::<()>("x = 1").unwrap();
    // Time passing is the point here.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(s.eval::<i64>("x"), Ok(1));
    assert_eq!(pool.metrics().sessions_expired, 0);
    pool.shutdown().unwrap();
}

#[test]
fn a_session_is_not_expired_right_after_a_long_request() {
    let idle_timeout = Duration::from_secs(1);
    let pool = IslePool::builder()
        .workers(1)
        .session_idle_timeout(idle_timeout)
        .build()
        .unwrap();
    let s = pool.session("slow");
    s.exec(move |_, env| {
        env.set("state", "kept")?;
        // The session is in use for twice the idle timeout.
        std::thread::sleep(2 * idle_timeout);
        Ok(())
    })
    .unwrap();
    // Well within the idle timeout of the request's end.
    std::thread::sleep(idle_timeout / 6);
    assert_eq!(s.eval::<Option<String>>("state"), Ok(Some("kept".into())));
    assert_eq!(pool.metrics().sessions_expired, 0);
    pool.shutdown().unwrap();
}

#[test]
fn globals_written_through_g_stay_in_the_session() {
    let pool = pool(1);
    let s = pool.session("dynamic");
    s.eval::<()>("_G['by_name'] = 1").unwrap();
    assert_eq!(s.eval::<Option<i64>>("by_name"), Ok(Some(1)));
    assert_eq!(pool.eval::<Option<i64>>("by_name"), Ok(None));
    assert_eq!(
        pool.session("other").eval::<Option<i64>>("by_name"),
        Ok(None)
    );
    pool.shutdown().unwrap();
}

#[test]
fn chunks_loaded_by_session_code_write_session_globals() {
    let pool = pool(1);
    let s = pool.session("loader");
    // Lua 5.1 and Luau: `load` of a string is `loadstring` (Luau has no
    // `load` at all).
    let load = if cfg!(any(feature = "lua51", feature = "luau")) {
        "loadstring"
    } else {
        "load"
    };
    s.eval::<()>(format!("{load}('from_load = 2')()")).unwrap();
    assert_eq!(s.eval::<Option<i64>>("from_load"), Ok(Some(2)));
    assert_eq!(pool.eval::<Option<i64>>("from_load"), Ok(None));
    assert_eq!(
        pool.session("other").eval::<Option<i64>>("from_load"),
        Ok(None)
    );
    pool.shutdown().unwrap();
}

#[test]
fn sessions_expire_while_the_pool_stays_busy() {
    let pool = IslePool::builder()
        .workers(1)
        .session_idle_timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    for k in 0..20 {
        pool.session(k).eval::<()>("x = 1").unwrap();
    }
    // Keep the only worker busy with a steady stream of requests while the
    // sessions sit idle; they must expire anyway.
    eventually("the idle sessions expire under load", || {
        let tasks: Vec<Task<()>> = (0..50).map(|_| pool.spawn_eval("")).collect();
        for t in tasks {
            t.wait().unwrap();
        }
        pool.metrics().sessions_expired >= 20
    });
    assert_eq!(pool.metrics().sessions_open, 0);
}

/// `load` of a string, on every backend (5.1 and Luau: `loadstring`).
const LOAD: &str = "local load = loadstring or load";

#[test]
fn load_runs_chunks_in_the_calling_session_however_it_is_reached() {
    let pool = IslePool::new(1, |lua| {
        // A function of init's that is handed a session's `load`.
        lua.load("function run_loader(loader, src) return loader(src)() end")
            .exec()
    })
    .unwrap();
    let s = pool.session("loader");
    let other = pool.session("other");
    s.eval::<()>(format!(
        r#"{LOAD}
        local ok, f = pcall(load, "by_pcall = 1") f()
        local function nested() return load("by_nested = 2")() end
        nested()
        coroutine.wrap(function() (loadstring or _G.load)("in_coroutine = 3")() end)()
        run_loader(load, "via_init = 4")
        function later(src) return (loadstring or _G.load)(src)() end
        "#
    ))
    .unwrap();
    // A function the session defined, called by a later request.
    s.eval::<()>("later('by_later = 5')").unwrap();
    let names = [
        "by_pcall",
        "by_nested",
        "in_coroutine",
        "via_init",
        "by_later",
    ];
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            s.eval::<Option<i64>>(*name),
            Ok(Some(i as i64 + 1)),
            "{name}"
        );
        assert_eq!(pool.eval::<Option<i64>>(*name), Ok(None), "{name}");
        assert_eq!(other.eval::<Option<i64>>(*name), Ok(None), "{name}");
    }
    // Each session's chunks land in its own globals.
    other
        .eval::<()>(format!("{LOAD} load('mine = \"other\"')()"))
        .unwrap();
    assert_eq!(s.eval::<Option<String>>("mine"), Ok(None));
    assert_eq!(other.eval::<String>("mine"), Ok("other".into()));
    pool.shutdown().unwrap();
}

#[test]
fn load_with_no_session_code_to_find_fails_rather_than_use_the_shared_globals() {
    let pool = pool(1);
    let s = pool.session("loader");
    // `load` finds the session by the functions on the call stack that run
    // in its globals: in this coroutine, the only one is `load` itself.
    let r = s.eval::<()>(format!("{LOAD} coroutine.wrap(load)('leaked = 1')()"));
    assert!(
        matches!(&r, Err(IsleError::Lua(e)) if e.message().contains("no session code")),
        "{r:?}"
    );
    assert_eq!(pool.eval::<Option<i64>>("leaked"), Ok(None));
    assert_eq!(s.eval::<Option<i64>>("leaked"), Ok(None));
    // With `_ENV` (5.2+), a function that reads no globals has none; called
    // in tail position by the request, it is alone on the stack too. Where
    // every function has an environment (5.1, LuaJIT, Luau), it is found.
    s.eval::<()>(format!("{LOAD} function later(src) return load(src)() end"))
        .unwrap();
    let r = s.eval::<()>("later('tail = 1')");
    if cfg!(any(feature = "lua51", feature = "luajit", feature = "luau")) {
        assert_eq!(r, Ok(()));
        assert_eq!(s.eval::<Option<i64>>("tail"), Ok(Some(1)));
    } else {
        assert!(
            matches!(&r, Err(IsleError::Lua(e)) if e.message().contains("no session code")),
            "{r:?}"
        );
    }
    assert_eq!(pool.eval::<Option<i64>>("tail"), Ok(None));
    pool.shutdown().unwrap();
}

#[test]
#[cfg(not(any(feature = "lua51", feature = "luajit", feature = "luau")))]
fn load_given_an_environment_runs_the_chunk_there() {
    let pool = pool(1);
    let s = pool.session("loader");
    let r =
        s.eval::<(Option<i64>, i64)>("local t = {} load('y = 1', 'chunk', 't', t)() return y, t.y");
    assert_eq!(r, Ok((None, 1)));
    pool.shutdown().unwrap();
}

#[test]
fn g_names_the_session_environment_and_its_metatable_is_hidden() {
    let pool = pool(1);
    let s = pool.session("g");
    assert_eq!(
        s.eval::<(bool, bool, bool)>(
            "rawset(_G, 'raw', 1) return _G._G == _G, getmetatable(_G) == false, raw == 1"
        ),
        Ok((true, true, true))
    );
    assert_eq!(pool.eval::<Option<i64>>("raw"), Ok(None));
    // Reads still reach the shared globals.
    assert_eq!(
        s.eval::<String>("shout(greeting)"),
        Ok("HELLO FROM INIT".into())
    );
    pool.shutdown().unwrap();
}

/// The Lua heap of every VM, after full collections.
fn lua_heap(pool: &IslePool) -> usize {
    pool.broadcast(|lua| {
        lua.gc_collect()?;
        lua.gc_collect()?;
        Ok(lua.used_memory())
    })
    .into_iter()
    .map(|r| r.unwrap())
    .sum()
}

#[test]
fn closing_sessions_gives_their_memory_back_to_the_vms() {
    const SESSIONS: u64 = 2_000;
    const HELD: usize = 1_000;
    let pool = IslePool::builder().workers(2).build().unwrap();
    // Each round opens SESSIONS sessions, each holding HELD bytes of its
    // own, and closes them all. The first round grows what Lua keeps once
    // grown (its string table, mlua's reference stack, the workers' maps),
    // so the baseline is taken after it: a second round must give back
    // what it took, not merely most of it.
    let round = |base: u64| {
        for k in base..base + SESSIONS {
            let s = pool.session(k);
            // A global from Rust (a string of its own: Luau interns them
            // all) and one from a (cached) chunk.
            s.exec(move |lua, env| env.set("held", lua.create_string(format!("{k:>HELD$}"))?))
                .unwrap();
            s.eval::<()>("y = #held").unwrap();
        }
        let open = lua_heap(&pool);
        for k in base..base + SESSIONS {
            assert!(pool.close_session(k));
        }
        open
    };
    round(0);
    // Broadcasts queue behind the closes.
    let before = lua_heap(&pool);
    let open = round(SESSIONS);
    let held = open.saturating_sub(before);
    assert!(held >= SESSIONS as usize * HELD, "{held} bytes held");
    let left = lua_heap(&pool).saturating_sub(before);
    assert!(left < held / 20, "{left} of {held} bytes left");
    pool.shutdown().unwrap();
}
