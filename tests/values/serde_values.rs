//! `Serde<T>` (the `serde` feature): Rust values in and out of requests on
//! every front, and conversions that fail naming the Rust type.
#![cfg(feature = "serde")]

use crate::common;

use std::collections::BTreeMap;

use common::front::fronts;
use common::within;
use mlua_isle::{Isle, IsleError, LuaErrorKind, Serde};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Config {
    port: u16,
    hosts: Vec<String>,
    debug: Option<bool>,
    limits: BTreeMap<String, u32>,
    mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Mode {
    Off,
    Fixed(u32),
    Range { low: i64, high: i64 },
}

fn config() -> Config {
    Config {
        port: 8080,
        hosts: vec!["a".into(), "b".into()],
        debug: None,
        limits: BTreeMap::from([("cpu".into(), 2), ("mem".into(), 512)]),
        mode: Mode::Range { low: -1, high: 9 },
    }
}

/// A value whose serialization fails.
struct Unserializable;

impl Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("cannot be written"))
    }
}

/// The failure `r` must be: a `Conversion` whose message names `type_name`.
fn conversion_naming<T: std::fmt::Debug>(r: Result<T, IsleError>, type_name: &str) {
    match r {
        Err(IsleError::Lua(e)) => {
            assert_eq!(e.kind(), LuaErrorKind::Conversion, "{e:?}");
            assert!(e.message().contains(type_name), "{e}");
        }
        other => panic!("expected a conversion error naming {type_name}, got {other:?}"),
    }
}

#[test]
fn results_read_into_rust_types_on_every_front() {
    within("results", || {
        fronts().each(|front| {
            let cfg: Serde<Config> = front
                .eval(
                    "return { port = 8080, hosts = { 'a', 'b' }, \
                              limits = { cpu = 2, mem = 512 }, \
                              mode = { Range = { low = -1, high = 9 } } }",
                )
                .unwrap();
            assert_eq!(cfg.into_inner(), config(), "{front}");
            let modes: Serde<Vec<Mode>> = front.eval("return { 'Off', { Fixed = 3 } }").unwrap();
            assert_eq!(*modes, [Mode::Off, Mode::Fixed(3)], "{front}");
            let none: Serde<Option<u8>> = front.eval("return nil").unwrap();
            assert_eq!(none.0, None);
            // In tuples, beside plain values.
            let (n, Serde(map)): (i64, Serde<BTreeMap<String, f64>>) =
                front.eval("return 1, { x = 0.5 }").unwrap();
            assert_eq!((n, map), (1, BTreeMap::from([("x".into(), 0.5)])));
        });
    });
}

#[test]
fn arguments_round_trip_through_lua_on_every_front() {
    within("round trips", || {
        fronts()
            .init(|lua| lua.load("function echo(...) return ... end").exec())
            .each(|front| {
                let back = front
                    .call::<Serde<Config>>("echo", Serde(config()))
                    .unwrap();
                assert_eq!(back.0, config(), "{front}");
                for mode in [Mode::Off, Mode::Fixed(7), Mode::Range { low: 0, high: 1 }] {
                    let back = front.call::<Serde<Mode>>("echo", Serde(mode.clone()));
                    assert_eq!(back, Ok(Serde(mode)), "{front}");
                }
                let empty: Serde<Vec<u8>> = front.call("echo", Serde(Vec::<u8>::new())).unwrap();
                assert!(empty.is_empty());
                let (a, b) = front
                    .call::<(Serde<Option<String>>, i64)>("echo", (Serde(Some("x")), 5))
                    .unwrap();
                assert_eq!((a.0.as_deref(), b), (Some("x"), 5));
            });
    });
}

#[test]
fn lua_sees_plain_values() {
    within("plain values", || {
        let isle = Isle::spawn(|lua| {
            lua.load(
                "function inspect(c) \
                     return c.debug == nil, getmetatable(c.hosts) == nil, #c.hosts, c.limits.mem \
                 end",
            )
            .exec()
        })
        .unwrap();
        let seen = isle.call::<(bool, bool, i64, i64)>("inspect", Serde(config()));
        assert_eq!(seen, Ok((true, true, 2, 512)));
    });
}

#[test]
fn sandboxed_tenants_get_tables_of_their_own() {
    within("sandbox", || {
        let isle = Isle::builder()
            .sandbox(true)
            .spawn(|lua| {
                lua.load("function keep(c) c.hosts[1] = 'changed'; c.port = 1; return c end")
                    .exec()
            })
            .unwrap();
        let back = isle.call::<Serde<Config>>("keep", Serde(config())).unwrap();
        assert_eq!((back.port, back.hosts[0].as_str()), (1, "changed"));
        let again = isle.call::<Serde<Config>>("keep", Serde(config())).unwrap();
        assert_eq!(again.hosts[1], "b", "each call builds new tables");
    });
}

#[test]
fn failed_conversions_name_the_type() {
    within("conversions", || {
        fronts()
            .init(|lua| lua.load("function echo(...) return ... end").exec())
            .each(|front| {
                conversion_naming(
                    front.eval::<Serde<Config>>("return { port = 'http' }"),
                    "Config",
                );
                conversion_naming(front.eval::<Serde<Config>>("return 42"), "Config");
                conversion_naming(front.eval::<Serde<Mode>>("return 'Sideways'"), "Mode");
                conversion_naming(front.eval::<Serde<Vec<u8>>>("return { print }"), "Vec<u8>");
                conversion_naming(
                    front.eval::<Serde<Vec<u8>>>("local t = {} t[1] = t return t"),
                    "Vec<u8>",
                );
                // An argument that fails to serialize.
                conversion_naming(
                    front.call::<()>("echo", Serde(Unserializable)),
                    "Unserializable",
                );
                assert_eq!(front.eval::<i64>("return 1"), Ok(1), "{front}");
            });
    });
}
