//! Exactly one Lua backend must be chosen; say which ones exist otherwise.

#[cfg(not(any(
    feature = "lua51",
    feature = "lua52",
    feature = "lua53",
    feature = "lua54",
    feature = "lua55",
    feature = "luajit",
    feature = "luau"
)))]
compile_error!(
    "mlua-isle: choose a Lua backend with one Cargo feature: \
     lua54 (default), lua55, lua53, lua52, lua51, luajit or luau"
);

#[cfg(any(
    all(
        feature = "lua51",
        any(
            feature = "lua52",
            feature = "lua53",
            feature = "lua54",
            feature = "lua55",
            feature = "luajit",
            feature = "luau"
        )
    ),
    all(
        feature = "lua52",
        any(
            feature = "lua53",
            feature = "lua54",
            feature = "lua55",
            feature = "luajit",
            feature = "luau"
        )
    ),
    all(
        feature = "lua53",
        any(
            feature = "lua54",
            feature = "lua55",
            feature = "luajit",
            feature = "luau"
        )
    ),
    all(
        feature = "lua54",
        any(feature = "lua55", feature = "luajit", feature = "luau")
    ),
    all(feature = "lua55", any(feature = "luajit", feature = "luau")),
    all(feature = "luajit", feature = "luau"),
))]
compile_error!(
    "mlua-isle: more than one Lua backend feature is enabled; keep exactly one \
     (to pick a non-default one, use `default-features = false, features = [\"lua53\", \"vendored\"]`)"
);
