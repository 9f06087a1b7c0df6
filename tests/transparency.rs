//! Lua code behaves in an isle as in plain mlua: what our wrappers add
//! (text-only chunks, interruption checks) narrows nothing else.

mod common;

/// `load`'s mode is narrowed to text, never replaced: a caller's `'b'`
/// still refuses text, as Lua does.
#[test]
#[cfg(not(any(feature = "lua51", feature = "luau")))] // 5.1: no mode; Luau: no load
fn load_narrows_the_callers_mode_to_text() {
    use mlua_isle::{Isle, IsleError};
    common::within("load modes", || {
        let isle = Isle::spawn(|_| Ok(())).unwrap();
        // Text is refused where the caller's mode refuses it.
        let refused: (bool, String) = isle
            .eval("local f, e = load('return 1', 'x', 'b') return f == nil, e")
            .unwrap();
        assert!(refused.0, "{refused:?}");
        // LuaJIT words it its own way.
        assert!(
            refused.1.contains("text chunk") || refused.1.contains("wrong mode"),
            "{refused:?}"
        );
        // And accepted where it allows it.
        for mode in ["'t'", "'bt'", "nil"] {
            assert_eq!(
                isle.eval::<i64>(format!("return load('return 1', 'x', {mode})()")),
                Ok(1),
                "mode {mode}"
            );
        }
        // Binary stays refused whatever the caller asks.
        for mode in ["'b'", "'bt'", "nil"] {
            let r: Result<(bool, String), IsleError> = isle.eval(format!(
                "local f, e = load(string.dump(function() end), 'x', {mode}) return f == nil, e"
            ));
            let (refused, message) = r.unwrap();
            assert!(refused, "mode {mode}");
            assert!(
                message.contains("binary") || message.contains("wrong mode"),
                "mode {mode}: {message}"
            );
        }
        // A reader's binary first piece too, under a mode without text.
        let r: (bool, String) = isle
            .eval(
                "local d = string.dump(function() end) local done \
                 local f, e = load(function() if done then return nil end done = true return d end, 'x', 'b') \
                 return f == nil, e",
            )
            .unwrap();
        assert!(r.0, "{r:?}");
    });
}
