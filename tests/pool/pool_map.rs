//! `IslePool::map`: one global function over many inputs, in batches.

use crate::common;

use std::time::Duration;

use common::{gate, within};
use mlua_isle::mlua::{self, Lua};
use mlua_isle::{IsleError, IslePool, LuaErrorKind};

const FUNCTIONS: &str = r#"
    function sq(x) return x * x end
    function divmod(a, b) return math.floor(a / b), a % b end
    function odd_fails(x)
        if x % 2 == 1 then error("odd input " .. x) end
        return x
    end
    function seven_loops(x)
        if x == 7 then while true do end end
        return x
    end
    not_a_function = 42
"#;

fn init(lua: &Lua) -> mlua::Result<()> {
    lua.load(FUNCTIONS).exec()
}

#[test]
fn results_come_back_one_per_input_in_input_order() {
    let pool = IslePool::new(3, init).unwrap();
    let out = pool.map::<i64, i64>("sq", 0..10_000);
    assert_eq!(out.len(), 10_000);
    for (i, r) in out.into_iter().enumerate() {
        assert_eq!(r, Ok((i * i) as i64), "input {i}");
    }
    // Fewer inputs than batches, one input, none.
    assert_eq!(pool.map::<i64, i64>("sq", [3, 4]), vec![Ok(9), Ok(16)]);
    assert_eq!(pool.map::<i64, i64>("sq", [5]), vec![Ok(25)]);
    assert_eq!(pool.map::<i64, i64>("sq", []), vec![]);
}

#[test]
fn inputs_and_results_can_be_several_values() {
    let pool = IslePool::new(2, init).unwrap();
    let out = pool.map::<(i64, i64), (i64, i64)>("divmod", (1..=100).map(|a| (a, 7)));
    for (a, r) in (1..=100).zip(out) {
        assert_eq!(r, Ok((a / 7, a % 7)));
    }
}

#[test]
fn a_lua_error_fails_only_its_own_input() {
    let pool = IslePool::new(2, init).unwrap();
    let out = pool.map::<i64, i64>("odd_fails", 0..100);
    for (i, r) in out.into_iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(r, Ok(i as i64));
        } else {
            let Err(IsleError::Lua(e)) = r else {
                panic!("input {i}: {r:?}")
            };
            assert_eq!(e.kind(), LuaErrorKind::Runtime);
            assert!(e.message().contains(&format!("odd input {i}")), "{e:?}");
        }
    }
    assert_eq!(pool.eval::<i64>("1 + 1"), Ok(2));
}

#[test]
fn a_missing_function_fails_every_input() {
    let pool = IslePool::new(2, init).unwrap();
    let out = pool.map::<i64, i64>("nope", 0..20);
    assert!(out
        .iter()
        .all(|r| *r == Err(IsleError::NotFound("nope".into()))));
    let out = pool.map::<i64, i64>("not_a_function", 0..3);
    assert!(out.iter().all(|r| matches!(r, Err(IsleError::Lua(e))
        if e.message().contains("not a function"))));
}

#[test]
fn a_batch_past_the_time_limit_fails_its_inputs_and_the_others_finish() {
    let pool = IslePool::builder()
        .workers(2)
        .default_timeout(Duration::from_secs(1))
        .init(init)
        .build()
        .unwrap();
    let out = within("map with an endless input", move || {
        pool.map::<i64, i64>("seven_loops", 0..64)
    });
    assert_eq!(out[7], Err(IsleError::Timeout));
    let timed_out = out
        .iter()
        .filter(|r| **r == Err(IsleError::Timeout))
        .count();
    // 2 workers x 4 batches of 8: only the batch holding 7.
    assert_eq!(timed_out, 8, "{out:?}");
    for (i, r) in out.iter().enumerate().filter(|(i, _)| !(0..8).contains(i)) {
        assert_eq!(*r, Ok(i as i64));
    }
}

#[test]
fn a_panicking_callback_fails_its_batch_with_the_panic() {
    let pool = IslePool::new(1, |lua| {
        let f = lua.create_function(|_, x: i64| {
            if x == 3 {
                panic!("three");
            }
            Ok(x)
        })?;
        lua.globals().set("f", f)
    })
    .unwrap();
    let out = pool.map::<i64, i64>("f", 0..8);
    // 1 worker x 4 batches of 2: the batch of 2 and 3.
    assert_eq!(out[2], Err(IsleError::Panic("three".into())));
    assert_eq!(out[3], Err(IsleError::Panic("three".into())));
    for i in [0, 1, 4, 5, 6, 7] {
        assert_eq!(out[i], Ok(i as i64));
    }
    assert_eq!(pool.eval::<i64>("1 + 1"), Ok(2));
}

#[test]
fn after_shutdown_every_input_is_shutdown() {
    let pool = IslePool::new(2, init).unwrap();
    pool.shutdown().unwrap();
    let out = pool.map::<i64, i64>("sq", 0..10);
    assert_eq!(out, vec![Err(IsleError::Shutdown); 10]);
}

#[test]
fn a_full_queue_fails_the_batches_that_do_not_fit() {
    let (g, block) = gate();
    let pool = IslePool::builder()
        .workers(1)
        .queue_capacity(2)
        .init(move |lua| {
            block.clone().register(lua, "block")?;
            init(lua)
        })
        .build()
        .unwrap();
    let blocker = pool.spawn_call::<()>("block", ());
    g.wait_started();
    // 4 batches; 2 fit in the queue.
    let pool2 = pool.clone();
    let mapping = std::thread::spawn(move || pool2.map::<i64, i64>("sq", 0..8));
    // The map cannot finish before the worker is free: release it once the
    // rejected batches have been counted.
    common::eventually("two batches are rejected", || pool.metrics().rejected >= 2);
    g.release();
    blocker.wait().unwrap();
    let out = mapping.join().unwrap();
    let full = out
        .iter()
        .filter(|r| **r == Err(IsleError::QueueFull))
        .count();
    assert_eq!(full, 4, "{out:?}");
    assert_eq!(&out[..4], &[Ok(0), Ok(1), Ok(4), Ok(9)]);
}

#[test]
fn map_from_a_pool_thread_is_reentrant() {
    let pool = IslePool::new(1, init).unwrap();
    let inner = pool.clone();
    let out = pool
        .exec(move |_| Ok(inner.map::<i64, i64>("sq", 0..3)))
        .unwrap();
    assert_eq!(out, vec![Err(IsleError::Reentrant); 3]);
}
